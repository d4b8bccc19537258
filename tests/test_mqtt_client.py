"""MQTT connection config and client factory: secrets, validation, and a real persistent session."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from pydantic import ValidationError

from agent.mqtt_client import (
    MqttConnectionConfig,
    SecretError,
    Will,
    credential_path,
    make_client,
    parse_broker,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("broker.local:1884", ("broker.local", 1884)),
        ("10.0.0.2", ("10.0.0.2", 1883)),
        ("[::1]:8883", ("::1", 8883)),
        ("[fe80::1]", ("fe80::1", 1883)),
    ],
)
def test_parse_broker(text: str, expected: tuple[str, int]) -> None:
    assert parse_broker(text) == expected


@pytest.mark.parametrize("bad", ["", ":1883", "host:0", "host:99999", "host:x", "::1:1883", "[::1"])
def test_parse_broker_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_broker(bad)


def test_password_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = MqttConnectionConfig(username="gw", password_env="EW_TEST_PW")
    monkeypatch.delenv("EW_TEST_PW", raising=False)
    with pytest.raises(SecretError, match="env var EW_TEST_PW is not set"):
        conn.resolve_password()
    monkeypatch.setenv("EW_TEST_PW", "s3cret")
    assert conn.resolve_password() == "s3cret"


def test_password_from_credentials_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    conn = MqttConnectionConfig(username="gw", password_credential="mqtt-password")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(SecretError, match="CREDENTIALS_DIRECTORY is not set"):
        conn.resolve_password()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(SecretError, match="'mqtt-password' not found"):
        conn.resolve_password()
    (tmp_path / "mqtt-password").write_text("from-systemd\n")
    assert conn.resolve_password() == "from-systemd"
    with pytest.raises(SecretError, match="plain file name"):
        credential_path("../etc/passwd")


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"username": "u", "password": "a", "password_env": "B"}, "at most one of password"),
        ({"password_env": "B"}, "needs a username"),
        ({"tls_ca_file": "/etc/ca.pem"}, "tls = false"),
        ({"tls": True, "tls_cert_file": "/c.pem"}, "go together"),
        (
            {"tls": True, "tls_cert_file": "/c.pem", "tls_key_file": "/k", "tls_key_credential": "k"},
            "at most one",
        ),
        ({"tls_insecure": True}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_connection_configs(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        MqttConnectionConfig(**kwargs)


def test_default_port_follows_tls() -> None:
    assert MqttConnectionConfig().effective_port == 1883
    assert MqttConnectionConfig(tls=True).effective_port == 8883
    assert MqttConnectionConfig(tls=True, port=9000).effective_port == 9000


def test_tls_context_always_verifies() -> None:
    ctx = MqttConnectionConfig(tls=True).ssl_context()

    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname


def test_make_client_reports_missing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EW_NOPE", raising=False)
    conn = MqttConnectionConfig(username="u", password_env="EW_NOPE")
    with pytest.raises(SecretError, match="EW_NOPE"):
        make_client(conn, "x")


def _connect_and_wait(client: mqtt.Client, timeout: float = 10) -> dict:
    got: dict = {}
    ev = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        got["session_present"] = flags.session_present
        got["rc"] = reason_code
        ev.set()

    client.on_connect = on_connect
    client.loop_start()
    assert ev.wait(timeout), "no CONNACK"
    return got


@pytest.mark.timeout(30)
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_persistent_session_keeps_queued_messages(broker, protocol: str) -> None:
    """A QoS1 message published while the subscriber is away is delivered when it comes back."""
    conn = MqttConnectionConfig(host=broker.host, port=broker.port, protocol=protocol)
    sub = make_client(conn, f"ew-test-sub-{protocol}")
    assert not _connect_and_wait(sub)["session_present"]
    sub.subscribe("t/x", qos=1)[0]

    time.sleep(0.3)
    sub.disconnect()
    sub.loop_stop()

    pub = make_client(conn, f"ew-test-pub-{protocol}", clean_start=True)
    _connect_and_wait(pub)
    pub.publish("t/x", b"while-away", qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()

    received: list[bytes] = []
    ev = threading.Event()
    sub2 = make_client(conn, f"ew-test-sub-{protocol}")
    sub2.on_message = lambda c, u, m: (received.append(m.payload), ev.set())
    assert _connect_and_wait(sub2)["session_present"]
    assert ev.wait(10)
    assert received == [b"while-away"]
    sub2.disconnect()
    sub2.loop_stop()


@pytest.mark.timeout(30)
def test_will_is_published_on_abrupt_loss(broker) -> None:
    conn = MqttConnectionConfig(host=broker.host, port=broker.port, keepalive=5)
    watcher = make_client(conn, "ew-watch", clean_start=True)
    got: list[bytes] = []
    ev = threading.Event()
    watcher.on_message = lambda c, u, m: (got.append(m.payload), ev.set())
    _connect_and_wait(watcher)
    watcher.subscribe("gw/status", qos=1)

    time.sleep(0.3)
    dying = make_client(conn, "ew-dying", will=Will("gw/status", b"offline", retain=False))
    _connect_and_wait(dying)
    dying.loop_stop()
    dying.socket().close()  # vanish without DISCONNECT: the broker must send the will
    assert ev.wait(15)
    assert got == [b"offline"]
    watcher.disconnect()
    watcher.loop_stop()
