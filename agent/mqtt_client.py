"""MQTT connection settings and a paho client factory shared by the MQTT source and the uplink.

One place decides how the agent talks to a broker: protocol version, persistent session, credentials
(read from an environment variable or a systemd credential, so the TOML file holds no secret) and TLS
(server verification is always on; there is deliberately no switch to turn it off).

Usage::

    client = make_client(conn, "edgewatch-gw-01-uplink", will=Will(topic, payload))
    client.on_connect = ...
    client.loop_start()   # connects in the background, reconnects with backoff

`make_client` already calls ``connect_async``, so ``loop_start()`` is all that is left to do.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883


class SecretError(ValueError):
    """A configured secret (env var, credential file) cannot be read. The message says which and why."""


def credentials_dir() -> Path:
    """The directory systemd's LoadCredential= fills; only meaningful when the service runs under it."""
    d = os.environ.get("CREDENTIALS_DIRECTORY")
    if not d:
        raise SecretError(
            "$CREDENTIALS_DIRECTORY is not set (credentials are provided by systemd LoadCredential=; "
            "outside systemd, export CREDENTIALS_DIRECTORY=/path/to/dir)"
        )
    return Path(d)


def credential_path(name: str) -> Path:
    """Path of the systemd credential `name`; raises SecretError if it does not exist."""
    if "/" in name or name in ("", ".", ".."):
        raise SecretError(f"credential name {name!r} must be a plain file name")
    path = credentials_dir() / name
    if not path.is_file():
        raise SecretError(f"credential {name!r} not found at {path}")
    return path


def read_env_secret(var: str) -> str:
    value = os.environ.get(var)
    if value is None:
        raise SecretError(f"env var {var} is not set")
    if value == "":
        raise SecretError(f"env var {var} is empty")
    return value


def read_credential(name: str) -> str:
    """Read a systemd credential as text, without its trailing newline."""
    try:
        return credential_path(name).read_text().rstrip("\r\n")
    except OSError as e:
        raise SecretError(f"credential {name!r} cannot be read: {e}") from e


def parse_broker(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``host:port`` (``[v6addr]:port`` for IPv6; port optional) into (host, port)."""
    address = address.strip()
    if not address:
        raise ValueError("broker address is empty")
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep:
            raise ValueError(f"broker address {address!r}: missing ']'")
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"broker address {address!r}: unexpected text after ']'")
    elif address.count(":") == 1:
        host, port_s = address.split(":")
    elif ":" in address:
        raise ValueError(f"broker address {address!r}: write IPv6 addresses as [addr]:port")
    else:
        host, port_s = address, ""
    if not host:
        raise ValueError(f"broker address {address!r}: empty host")
    if not port_s:
        return host, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"broker address {address!r}: port must be 1-65535")
    return host, int(port_s)


def is_loopback(host: str) -> bool:
    """True for a host that never leaves the machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MqttConnectionConfig(BaseModel):
    """How to reach one MQTT broker. Secrets come from env vars or systemd credentials, not the file."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", min_length=1, description="Broker host name or IP address.")
    port: int | None = Field(
        None, ge=1, le=65535, description="Broker TCP port. Default 1883, or 8883 when tls = true."
    )
    protocol: Literal["3.1.1", "5"] = Field(
        "5",
        description='MQTT protocol version: "5" (default; a publish the broker refuses, e.g. by ACL, is '
        'reported and stays in the outbox) or "3.1.1" (mosquitto acknowledges a refused publish and '
        "drops it silently).",
    )
    keepalive: int = Field(30, ge=5, le=65535, description="Keepalive interval in seconds.")
    session_expiry_s: int = Field(
        86400,
        ge=0,
        description="MQTT 5 only: how long the broker keeps the persistent session (and queued QoS1 "
        "messages) while the client is away, in seconds. MQTT 3.1.1 sessions never expire.",
    )
    reconnect_min_s: float = Field(
        1.0, gt=0, description="First reconnect delay in seconds (doubles each try)."
    )
    reconnect_max_s: float = Field(60.0, gt=0, description="Longest reconnect delay in seconds.")
    username: str | None = Field(None, description="User name for broker authentication (not a secret).")
    password: str | None = Field(
        None,
        description="Literal password. Discouraged: it puts a secret in the file; use password_env or "
        "password_credential.",
    )
    password_env: str | None = Field(
        None, description="Name of the environment variable holding the password."
    )
    password_credential: str | None = Field(
        None,
        description="File name under $CREDENTIALS_DIRECTORY (systemd LoadCredential=) holding the password.",
    )
    tls: bool = Field(False, description="Use TLS. The server certificate and host name are always verified.")
    tls_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) that signed the broker certificate. Default: the system CAs."
    )
    tls_cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    tls_key_file: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    tls_key_credential: str | None = Field(
        None, description="Client private key as a systemd credential name (instead of tls_key_file)."
    )

    @model_validator(mode="after")
    def _check(self) -> MqttConnectionConfig:
        n_pw = sum(x is not None for x in (self.password, self.password_env, self.password_credential))
        if n_pw > 1:
            raise ValueError("give at most one of password, password_env, password_credential")
        if n_pw and not self.username:
            raise ValueError("a password needs a username")
        if n_pw and not self.tls and not is_loopback(self.host):
            raise ValueError(
                f"the password would cross the network to {self.host} in clear text: set tls = true "
                "(plain MQTT with a password is allowed only to a broker on this machine)"
            )
        tls_fields = {
            "tls_ca_file": self.tls_ca_file,
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
            "tls_key_credential": self.tls_key_credential,
        }
        given = [k for k, v in tls_fields.items() if v is not None]
        if given and not self.tls:
            raise ValueError(f"{', '.join(given)} set but tls = false; set tls = true")
        if self.tls_key_file is not None and self.tls_key_credential is not None:
            raise ValueError("give at most one of tls_key_file, tls_key_credential")
        has_key = self.tls_key_file is not None or self.tls_key_credential is not None
        if has_key != (self.tls_cert_file is not None):
            raise ValueError(
                "tls_cert_file and a client key (tls_key_file or tls_key_credential) go together"
            )
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return DEFAULT_TLS_PORT if self.tls else DEFAULT_PORT

    def resolve_password(self) -> str | None:
        """The password from wherever it is configured; SecretError if it is configured but unreadable."""
        if self.password_env is not None:
            return read_env_secret(self.password_env)
        if self.password_credential is not None:
            return read_credential(self.password_credential)
        return self.password

    def resolve_key_file(self) -> Path | None:
        if self.tls_key_credential is not None:
            return credential_path(self.tls_key_credential)
        return self.tls_key_file

    def check_secrets(self) -> list[str]:
        """Problems resolving secrets and TLS files here and now (for `config check`); empty if all fine."""
        problems = []
        try:
            self.resolve_password()
        except SecretError as e:
            problems.append(str(e))
        try:
            self.resolve_key_file()
        except SecretError as e:
            problems.append(str(e))
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                problems.append(f"{name} {p} does not exist")
        return problems

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that verifies the server certificate and host name (always)."""
        ctx = ssl.create_default_context(cafile=str(self.tls_ca_file) if self.tls_ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_cert_file is not None:
            key = self.resolve_key_file()
            ctx.load_cert_chain(str(self.tls_cert_file), str(key) if key else None)
        return ctx


@dataclass(frozen=True, slots=True)
class Will:
    """Last-will message the broker publishes if the client vanishes without disconnecting."""

    topic: str
    payload: bytes | str
    qos: int = 1
    retain: bool = True


def make_client(
    conn: MqttConnectionConfig,
    client_id: str,
    *,
    clean_start: bool = False,
    will: Will | None = None,
) -> mqtt.Client:
    """A configured, not yet started paho client; call ``loop_start()`` to connect.

    With ``clean_start=False`` the broker keeps the session (subscriptions and queued QoS1 messages)
    across disconnects, which needs a fixed `client_id`. Raises SecretError if a secret is missing.
    """
    if not client_id:
        raise ValueError("a fixed, non-empty client_id is needed")
    v5 = conn.protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else clean_start,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    if conn.username:
        client.username_pw_set(conn.username, conn.resolve_password())
    if conn.tls:
        client.tls_set_context(conn.ssl_context())
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    client.reconnect_delay_set(min_delay=conn.reconnect_min_s, max_delay=conn.reconnect_max_s)  # type: ignore[arg-type]
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0 if clean_start else conn.session_expiry_s
    client.connect_async(
        conn.host,
        conn.effective_port,
        keepalive=conn.keepalive,
        clean_start=clean_start if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
    )
    return client
