"""Security of the MQTT links, proven against a real mosquitto with TLS, passwords and an ACL.

The broker here is set up the way docs/security.md tells an operator to set up a real one: TLS only,
no anonymous clients, a hashed password file, an ACL that confines each gateway to its own topics.
Certificates are generated per test session (tests/tls_util.py). Secrets reach the agent only through
env vars and a $CREDENTIALS_DIRECTORY, as under systemd LoadCredential=.
"""

from __future__ import annotations

import getpass
import json
import logging
import re
import shutil
import ssl
import textwrap
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker, free_port, make_broker
from pydantic import ValidationError
from tls_util import Pki, make_password_file, make_pki

from agent.config import load_config
from agent.mqtt_client import MqttConnectionConfig, is_loopback, make_client
from agent.parse import parse
from agent.source import MqttSource, MqttSourceConfig
from agent.types import Event, RawMessage, Reading
from agent.uplink import Outbox, OutboxMessage, Uplink, UplinkConfig

AGENT_DIR = Path(__file__).resolve().parents[1] / "agent"

PASSWORDS = {
    "gw-01": "gw-01 pass: with spaces & symbols",
    "backend": "backend-pass",
    "sensor-01": "sensor-pass",
    "gw-01-source": "source-pass",
}

# Each line pair is what docs/security.md tells an operator to write for that role.
ACL = """\
# gateway gw-01 (its uplink): writes its own alerts, health and status; reads only its commands
user gw-01
topic write edgewatch/gw-01/#
topic read edgewatch/gw-01/cmd

# the back end: reads what every gateway sends, writes commands
user backend
topic read edgewatch/#
topic write edgewatch/+/cmd

# a sensor publishing telemetry for the gateway's MQTT source
user sensor-01
topic write edgewatch/sensors/+/telemetry

# the gateway's MQTT source: reads telemetry, nothing else
user gw-01-source
topic read edgewatch/sensors/+/telemetry
"""


# The fleet form (docs/security.md): one `pattern` line confines every gateway whose user name is its id.
PATTERN_ACL = """\
pattern write edgewatch/%u/#
pattern read edgewatch/%u/cmd

user backend
topic read edgewatch/#
topic write edgewatch/+/cmd

user sensor-01
topic write edgewatch/sensors/+/telemetry
"""
ACLS = pytest.mark.parametrize(
    "secure_broker", [ACL, PATTERN_ACL], ids=["per-user-acl", "pattern-acl"], indirect=True
)


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# -- the broker -----------------------------------------------------------------------------------


@dataclass
class SecureBroker:
    """mosquitto with three TLS listeners sharing one password file and ACL:

    - `broker.port` (127.0.0.1): TLS + password;
    - `mtls_port` (127.0.0.1): TLS + password + a client certificate from our CA (require_certificate);
    - `alias_port` (bound to 127.0.0.2, which the server certificate does not name): host name check.
    """

    broker: Broker
    mtls_port: int
    alias_port: int
    pki: Pki

    @property
    def port(self) -> int:
        return self.broker.port

    def log_text(self) -> str:
        return self.broker.log.read_text(errors="replace")

    def conn(self, **kw: object) -> MqttConnectionConfig:
        """Connection settings for the TLS + password listener, trusting the test CA (override any)."""
        args: dict[str, object] = {
            "host": "127.0.0.1",
            "port": self.port,
            "tls": True,
            "tls_ca_file": self.pki.ca.cert,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.3,
        }
        args.update(kw)
        return MqttConnectionConfig.model_validate(args)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def secure_broker(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki) -> Iterator[SecureBroker]:
    """The broker with the ACL above, or the one given by indirect parametrization."""
    pw = make_password_file(tmp_path / "passwd", PASSWORDS)
    acl = tmp_path / "acl"
    acl.write_text(getattr(request, "param", ACL))
    tls = f"cafile {pki.ca.cert}\ncertfile {pki.server.cert}\nkeyfile {pki.server.key}\ntls_version tlsv1.2\n"
    mtls_port, alias_port = free_port(), free_port()
    # make_broker's first `listener` line is still the current listener when extra_conf starts, so the
    # first TLS block applies to it: the broker has no plaintext port at all. `user` keeps mosquitto
    # from dropping to the `mosquitto` account (when the tests run as root), which could not read tmp_path.
    extra = (
        f"user {getpass.getuser()}\nallow_anonymous false\npassword_file {pw}\nacl_file {acl}\n{tls}"
        f"listener {mtls_port} 127.0.0.1\n{tls}require_certificate true\n"
        f"listener {alias_port} 127.0.0.2\n{tls}"
    )
    b = make_broker(tmp_path, extra)
    b.start()
    yield SecureBroker(b, mtls_port, alias_port, pki)
    b.stop()


class Subscriber:
    """A test-side MQTT client (built by the agent's own make_client) recording what it receives."""

    def __init__(self, conn: MqttConnectionConfig, topic: str, client_id: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = make_client(conn, client_id, clean_start=True)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((m.topic, m.payload))

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.messages]

    def round_trip(self, topic: str) -> None:
        """A QoS 1 publish and its PUBACK on this connection. Anything the broker routed to us before
        it read this publish is in our socket ahead of the PUBACK, so once this returns, a message that
        was going to reach us has reached us (proves an absence without a sleep)."""
        self.client.publish(topic, b"ping", qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connected_client(conn: MqttConnectionConfig, client_id: str) -> mqtt.Client:
    """A started client that has its CONNACK (publishing before it would race the connect)."""
    client = make_client(conn, client_id, clean_start=True)
    up = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: up.set() if not rc.is_failure else None
    client.loop_start()
    assert up.wait(10), f"{client_id} could not connect"
    return client


def backend(sb: SecureBroker, topic: str = "edgewatch/#") -> Subscriber:
    return Subscriber(sb.conn(username="backend", password=PASSWORDS["backend"]), topic, "ew-backend")


def alert(device: str, i: int) -> Event:
    return Event("alert", device, {"v": 1, "type": "alert", "msg_id": f"{device}:{i}", "seq": i})


@pytest.fixture
def uplinks(db_path: Path) -> Iterator[Callable[..., Uplink]]:
    """Uplink factory over a real outbox file; stops and closes everything it made."""
    made: list[Uplink] = []

    def make(conn: MqttConnectionConfig, path: Path = db_path, gateway: str = "gw-01") -> Uplink:
        up = Uplink(UplinkConfig(mqtt=conn, shutdown_flush_s=0), Outbox(path), gateway)
        made.append(up)
        return up

    yield make
    for up in made:
        up.stop(timeout=1)
        up.outbox.close()


def gateway_env(monkeypatch: pytest.MonkeyPatch, password: str = PASSWORDS["gw-01"]) -> None:
    monkeypatch.setenv("EW_MQTT_PASSWORD", password)


# -- delivery over TLS with secrets from env and credentials ---------------------------------------

UPLINK_TOML = """
[uplink.mqtt]
host = "{host}"
port = {port}
protocol = "{protocol}"
tls = true
tls_ca_file = "{ca}"
username = "gw-01"
password_env = "EW_MQTT_PASSWORD"
reconnect_min_s = 0.05
reconnect_max_s = 0.3
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("host", "protocol"), [("127.0.0.1", "3.1.1"), ("127.0.0.1", "5"), ("localhost", "5")]
)
def test_uplink_delivers_over_tls_with_password_from_env(
    secure_broker: SecureBroker,
    uplinks,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    host: str,
    protocol: str,
) -> None:
    """The certificate names both 127.0.0.1 (IP SAN) and localhost (DNS SAN); both verify."""
    caplog.set_level(logging.DEBUG)
    text = UPLINK_TOML.format(
        host=host, port=secure_broker.port, protocol=protocol, ca=secure_broker.pki.ca.cert
    )
    conn = UplinkConfig.model_validate(tomllib.loads(text)["uplink"]).mqtt
    gateway_env(monkeypatch)
    assert PASSWORDS["gw-01"] not in text and conn.password is None  # the file names the variable only

    sub = backend(secure_broker)
    try:
        up = uplinks(conn)
        assert up.enqueue(alert("pump-01", 1))
        up.start()
        assert wait_for(lambda: "edgewatch/gw-01/pump-01/alert" in sub.topics())
        assert wait_for(lambda: up.outbox.depth() == 0)  # PUBACK over TLS deleted it
        got = [json.loads(p) for t, p in sub.messages if t.endswith("/alert")]
        assert got == [{"v": 1, "type": "alert", "msg_id": "pump-01:1", "seq": 1}]
        assert_no_secret_logged(caplog)
    finally:
        sub.close()


@pytest.mark.timeout(30)
def test_uplink_mutual_tls_with_secrets_from_credentials_directory(
    secure_broker: SecureBroker, uplinks, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Password and client key both come from $CREDENTIALS_DIRECTORY (systemd LoadCredential=)."""
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "mqtt-password").write_text(PASSWORDS["gw-01"] + "\n")
    shutil.copy(secure_broker.pki.client.key, creds / "mqtt-tls-key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    conn = secure_broker.conn(
        port=secure_broker.mtls_port,
        username="gw-01",
        password_credential="mqtt-password",
        tls_cert_file=secure_broker.pki.client.cert,
        tls_key_credential="mqtt-tls-key",
    )
    assert conn.tls_key_file is None and conn.password is None

    sub = backend(secure_broker)
    try:
        up = uplinks(conn)
        assert up.enqueue(alert("pump-01", 1))
        up.start()
        assert wait_for(lambda: "edgewatch/gw-01/pump-01/alert" in sub.topics())
        assert wait_for(lambda: up.outbox.depth() == 0)
    finally:
        sub.close()


def connack(conn: MqttConnectionConfig, client_id: str) -> mqtt.ReasonCode:
    """The broker's answer to one connection attempt."""
    codes: list[mqtt.ReasonCode] = []
    client = make_client(conn, client_id, clean_start=True)
    client.on_connect = lambda c, u, f, rc, p: codes.append(rc)
    client.loop_start()
    try:
        assert wait_for(lambda: bool(codes)), f"{client_id}: no CONNACK"
        return codes[0]
    finally:
        client.disconnect()
        client.loop_stop()


def documented_blocks() -> tuple[str, str]:
    """The mosquitto config and the ACL exactly as docs/security.md gives them."""
    text = (AGENT_DIR.parent / "docs" / "security.md").read_text()
    blocks = re.findall(r"```conf\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 2, "docs/security.md lost its mosquitto config or ACL block"
    return blocks[0], blocks[1]


@pytest.mark.timeout(30)
def test_the_documented_broker_setup_works(
    tmp_path: Path, pki: Pki, uplinks, monkeypatch: pytest.MonkeyPatch, creds_dir: Path
) -> None:
    """docs/security.md's broker config and ACL, run as written: the uplink delivers on both listeners
    (password; password + client certificate), and the ACL lets the back end read it."""
    conf_text, acl_text = documented_blocks()
    p1, p2 = free_port(), free_port()
    subs = {
        "/etc/mosquitto/passwd": str(make_password_file(tmp_path / "passwd", PASSWORDS)),
        "/etc/mosquitto/acl": str(tmp_path / "acl"),
        "/etc/mosquitto/certs/ca.crt": str(pki.ca.cert),
        "/etc/mosquitto/certs/broker.crt": str(pki.server.cert),
        "/etc/mosquitto/certs/broker.key": str(pki.server.key),
        "listener 8883": f"listener {p1} 127.0.0.1",
        "listener 8884": f"listener {p2} 127.0.0.1",
    }
    for old, new in subs.items():
        assert old in conf_text, f"docs/security.md config no longer has {old!r}"
        conf_text = conf_text.replace(old, new)
    (tmp_path / "acl").write_text(acl_text)
    conf = tmp_path / "documented.conf"
    conf.write_text(f"user {getpass.getuser()}\n{conf_text}")
    b = Broker(port=p1, conf=conf, log=tmp_path / "documented.log")
    b.start()
    try:
        sb = SecureBroker(b, p2, 0, pki)
        sub = backend(sb)
        gateway_env(monkeypatch)
        shutil.copy(pki.client.key, creds_dir / "mqtt-tls-key")
        try:
            first = uplinks(sb.conn(username="gw-01", password_env="EW_MQTT_PASSWORD"), tmp_path / "a.db")
            mutual = uplinks(
                sb.conn(
                    port=p2,
                    username="gw-01",
                    password_env="EW_MQTT_PASSWORD",
                    tls_cert_file=pki.client.cert,
                    tls_key_credential="mqtt-tls-key",
                ),
                tmp_path / "b.db",
            )
            first.enqueue(alert("pump-01", 1))
            mutual.enqueue(alert("pump-02", 1))
            first.start()
            mutual.start()
            want = {"edgewatch/gw-01/pump-01/alert", "edgewatch/gw-01/pump-02/alert"}
            assert wait_for(lambda: want <= set(sub.topics()))
            assert wait_for(lambda: first.outbox.depth() == mutual.outbox.depth() == 0)
            assert connack(sb.conn(), "ew-anonymous").is_failure  # and nobody gets in without a password
        finally:
            sub.close()
    finally:
        b.stop()


# -- refused connections keep the message ---------------------------------------------------------


def assert_never_delivered(up: Uplink, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """The uplink tried at least twice, failed for `reason`, and never published the queued alert."""
    assert wait_for(lambda: up._fail_streak >= 2), "the uplink never failed a connection attempt"
    assert not up.connected
    rows = up.outbox.peek(10)
    assert [r.msg_id for r in rows] == ["pump-01:1"]
    assert rows[0].attempts == 0  # never even published: no CONNACK came
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "agent.uplink")
    assert re.search(reason, logged, re.IGNORECASE), logged
    assert_no_secret_logged(caplog)


def assert_no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert not [user for user, pw in PASSWORDS.items() if pw in text]


@pytest.mark.timeout(30)
def test_missing_secret_is_named_and_picked_up_at_the_next_connect(
    secure_broker: SecureBroker, uplinks, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A secret is read at each connect: provide it late (or rotate it) and no restart is needed."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("EW_MQTT_PASSWORD", raising=False)
    sub = backend(secure_broker)
    try:
        up = uplinks(secure_broker.conn(username="gw-01", password_env="EW_MQTT_PASSWORD"))
        up.enqueue(alert("pump-01", 1))
        up.start()
        assert_never_delivered(up, caplog, "env var EW_MQTT_PASSWORD is not set")
        gateway_env(monkeypatch)
        assert wait_for(lambda: "edgewatch/gw-01/pump-01/alert" in sub.topics())
        assert wait_for(lambda: up.outbox.depth() == 0)
        assert_no_secret_logged(caplog)
    finally:
        sub.close()


@pytest.mark.timeout(30)
def test_wrong_ca_fails_and_the_outbox_keeps_the_message(
    secure_broker: SecureBroker, uplinks, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.uplink")
    gateway_env(monkeypatch)
    sub = backend(secure_broker)
    try:
        wrong = uplinks(
            secure_broker.conn(
                tls_ca_file=secure_broker.pki.other_ca.cert, username="gw-01", password_env="EW_MQTT_PASSWORD"
            )
        )
        wrong.enqueue(alert("pump-01", 1))
        wrong.start()
        assert_never_delivered(wrong, caplog, "certificate verify failed")
        wrong.stop(timeout=1)
        wrong.outbox.close()

        # The same outbox with the right CA delivers it: the CA alone made the difference.
        right = uplinks(secure_broker.conn(username="gw-01", password_env="EW_MQTT_PASSWORD"))
        right.start()
        assert wait_for(lambda: "edgewatch/gw-01/pump-01/alert" in sub.topics())
        assert wait_for(lambda: right.outbox.depth() == 0)
    finally:
        sub.close()


@pytest.mark.timeout(30)
def test_host_name_not_in_the_certificate_fails(
    secure_broker: SecureBroker, uplinks, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate from the right CA for another name is refused (check_hostname really applies)."""
    caplog.set_level(logging.WARNING, logger="agent.uplink")
    gateway_env(monkeypatch)
    up = uplinks(
        secure_broker.conn(
            host="127.0.0.2", port=secure_broker.alias_port, username="gw-01", password_env="EW_MQTT_PASSWORD"
        )
    )
    up.enqueue(alert("pump-01", 1))
    up.start()
    assert_never_delivered(up, caplog, "IP address mismatch|hostname mismatch")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("user", "password"),
    [("gw-01", "not-the-password"), ("gw-99", PASSWORDS["gw-01"]), (None, None)],
    ids=["wrong-password", "unknown-user", "anonymous"],
)
def test_bad_credentials_are_refused_and_the_outbox_keeps_the_message(
    secure_broker: SecureBroker,
    uplinks,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    user: str | None,
    password: str | None,
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.uplink")
    kw: dict[str, object] = {}
    if user is not None:
        gateway_env(monkeypatch, password or "")
        kw = {"username": user, "password_env": "EW_MQTT_PASSWORD"}
    up = uplinks(secure_broker.conn(**kw))
    up.enqueue(alert("pump-01", 1))
    up.start()
    assert_never_delivered(up, caplog, "refused the connection: not authori[sz]ed")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("which", "broker_says"),
    [("none", "peer did not return a certificate"), ("foreign-ca", "certificate verify failed")],
)
def test_mtls_listener_refuses_a_client_without_our_certificate(
    secure_broker: SecureBroker,
    uplinks,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    which: str,
    broker_says: str,
) -> None:
    """A valid password is not enough where require_certificate is on."""
    caplog.set_level(logging.WARNING, logger="agent.uplink")
    gateway_env(monkeypatch)
    kw: dict[str, object] = {
        "port": secure_broker.mtls_port,
        "username": "gw-01",
        "password_env": "EW_MQTT_PASSWORD",
    }
    if which == "foreign-ca":
        other = secure_broker.pki.other_client
        kw |= {"tls_cert_file": other.cert, "tls_key_file": other.key}
    up = uplinks(secure_broker.conn(**kw))
    up.enqueue(alert("pump-01", 1))
    up.start()
    # TLS 1.3 completes the client's side of the handshake before the server checks the client
    # certificate, so the client sees a lost connection; the broker's log says why.
    assert_never_delivered(up, caplog, "connection to .* lost")
    assert wait_for(lambda: broker_says in secure_broker.log_text()), secure_broker.log_text()


# -- the ACL ----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@ACLS
def test_acl_refuses_a_publish_to_another_gateways_topic(
    secure_broker: SecureBroker, uplinks, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    """gw-01's credentials cannot write under edgewatch/gw-02/, even through its own outbox."""
    gateway_env(monkeypatch)
    sub = backend(secure_broker)
    try:
        up = uplinks(secure_broker.conn(username="gw-01", password_env="EW_MQTT_PASSWORD", protocol=protocol))
        foreign = "edgewatch/gw-02/pump-01/alert"
        payload = json.dumps({"v": 1, "type": "alert", "msg_id": "forged"}).encode()
        assert up.outbox.put(OutboxMessage("forged", foreign, payload, device="pump-01"))
        assert up.enqueue(alert("pump-01", 1))  # queued after the forged one, sent after it in order
        up.start()
        assert wait_for(lambda: "edgewatch/gw-01/pump-01/alert" in sub.topics())
        sub.round_trip("edgewatch/backend-ping")  # flush anything routed to us before
        assert foreign not in sub.topics()
        assert all(not t.startswith("edgewatch/gw-02/") for t in sub.topics())
        if protocol == "5":
            # MQTT 5 tells the client: PUBACK "Not authorized", so the uplink keeps the row.
            assert wait_for(lambda: [r.msg_id for r in up.outbox.peek(10)] == ["forged"])
        else:
            # MQTT 3.1.1 has no way to say no: mosquitto acknowledges and drops the message silently.
            assert wait_for(lambda: up.outbox.depth() == 0)
    finally:
        sub.close()


@pytest.mark.timeout(30)
@ACLS
def test_gateway_credentials_read_nothing(secure_broker: SecureBroker) -> None:
    """A stolen gateway password does not let anyone read other gateways' alerts or the telemetry."""
    spy = Subscriber(secure_broker.conn(username="gw-01", password=PASSWORDS["gw-01"]), "#", "ew-spy")
    sub = backend(secure_broker)
    gw = connected_client(secure_broker.conn(username="gw-01", password=PASSWORDS["gw-01"]), "ew-gw")
    sensor = connected_client(
        secure_broker.conn(username="sensor-01", password=PASSWORDS["sensor-01"]), "ew-s1"
    )
    try:
        # gw-01 publishes an alert and a sensor its telemetry: the backend reads both, the spy (with
        # gw-01's credentials) reads neither, not even gw-01's own alert.
        gw.publish("edgewatch/gw-01/pump-01/alert", b"{}", qos=1).wait_for_publish(10)
        sensor.publish("edgewatch/sensors/pump-01/telemetry", b"{}", qos=1).wait_for_publish(10)
        assert wait_for(lambda: len(sub.topics()) >= 2)
        spy.round_trip("edgewatch/gw-01/ping")
        assert spy.topics() == []
    finally:
        for c in (gw, sensor):
            c.disconnect()
            c.loop_stop()
        spy.close()
        sub.close()


@pytest.mark.timeout(30)
@ACLS
def test_only_the_back_end_can_command_a_gateway(secure_broker: SecureBroker) -> None:
    """The gateway's command subscription (its own credentials, the agent's MqttSource on its own
    topic) gets the back end's command and never one forged by a sensor or another gateway."""
    from conftest import Collector

    from agent.source import MqttSource, MqttSourceConfig

    conn = secure_broker.conn(username="gw-01", password=PASSWORDS["gw-01"])
    sub = MqttSource(
        MqttSourceConfig(type="mqtt", name="commands", mqtt=conn, client_id="ew-gw-01-cmd"),
        topic="edgewatch/gw-01/cmd",
    )
    got = Collector()
    sub.start(got)
    sensor = connected_client(
        secure_broker.conn(username="sensor-01", password=PASSWORDS["sensor-01"]), "ew-s1"
    )
    other = connected_client(
        secure_broker.conn(username="gw-01-source", password=PASSWORDS["gw-01-source"]), "ew-o"
    )
    ops = backend(secure_broker, "edgewatch/gw-01/cmd")
    try:
        assert sub.subscribed.wait(10), "the gateway may not read its own command topic"
        for c in (sensor, other):
            c.publish("edgewatch/gw-01/cmd", b'{"type":"reload","msg_id":"forged"}', qos=1).wait_for_publish(
                10
            )
        ops.client.publish(
            "edgewatch/gw-01/cmd", b'{"type":"reload","msg_id":"ops"}', qos=1
        ).wait_for_publish(10)
        # the back end's own subscription sees its command come back: everything routed before it is in
        assert wait_for(lambda: "edgewatch/gw-01/cmd" in ops.topics())
        (msg,) = got.wait_for(1)
        assert json.loads(msg.payload)["msg_id"] == "ops"
        ops.round_trip("edgewatch/gw-01/cmd")
        assert [json.loads(m.payload)["msg_id"] for m in got.items if m.payload != b"ping"] == ["ops"]
    finally:
        sub.stop()
        for c in (sensor, other):
            c.disconnect()
            c.loop_stop()
        ops.close()


# -- the MQTT source over TLS ---------------------------------------------------------------------


def mqtt_source(sb: SecureBroker, creds: Path, user: str) -> MqttSource:
    """The agent's MQTT source over TLS; its password is a credential file, as under LoadCredential=."""
    (creds / "mqtt-source-password").write_text(PASSWORDS[user] + "\n")
    conn = sb.conn(username=user, password_credential="mqtt-source-password")
    text = f"""
        type = "mqtt"
        name = "sensors-tls"
        client_id = "ew-{user}"
        [mqtt]
        host = "127.0.0.1"
        port = {sb.port}
        tls = true
        tls_ca_file = "{sb.pki.ca.cert}"
        username = "{user}"
        password_credential = "mqtt-source-password"
    """
    cfg = MqttSourceConfig.model_validate(tomllib.loads(textwrap.dedent(text)))
    assert cfg.mqtt == conn.model_copy(update={"reconnect_min_s": 1.0, "reconnect_max_s": 60.0})
    return MqttSource(cfg)


@pytest.fixture
def creds_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    return creds


TELEMETRY = {"v": 1, "device": "pump-01", "seq": 1, "ts": 1_764_806_400_000, "values": {"temperature": 41.5}}


@pytest.mark.timeout(30)
def test_mqtt_source_receives_telemetry_over_tls(secure_broker: SecureBroker, creds_dir: Path) -> None:
    received: list[RawMessage] = []
    source = mqtt_source(secure_broker, creds_dir, "gw-01-source")
    sensor = connected_client(
        secure_broker.conn(username="sensor-01", password=PASSWORDS["sensor-01"]), "ew-s1"
    )
    source.start(received.append)
    try:
        assert source.subscribed.wait(10), "the source did not subscribe over TLS"
        payload = json.dumps(TELEMETRY).encode()
        sensor.publish("edgewatch/sensors/pump-01/telemetry", payload, qos=1).wait_for_publish(10)
        assert wait_for(lambda: len(received) == 1)
        assert received[0].payload == payload
        reading = parse(received[0])
        assert isinstance(reading, Reading), reading
        assert (reading.device, reading.values) == ("pump-01", {"temperature": 41.5})
    finally:
        source.stop()
        sensor.disconnect()
        sensor.loop_stop()


@pytest.mark.timeout(30)
def test_mqtt_source_with_the_uplinks_credentials_gets_no_telemetry(
    secure_broker: SecureBroker, creds_dir: Path
) -> None:
    """The uplink's user (gw-01) may not read telemetry. mosquitto grants the subscription (SUBACK ok)
    but delivers nothing the ACL does not let that user read."""
    received: list[RawMessage] = []
    source = mqtt_source(secure_broker, creds_dir, "gw-01")
    allowed = Subscriber(
        secure_broker.conn(username="gw-01-source", password=PASSWORDS["gw-01-source"]),
        "edgewatch/sensors/+/telemetry",
        "ew-allowed",
    )
    sensor = connected_client(
        secure_broker.conn(username="sensor-01", password=PASSWORDS["sensor-01"]), "ew-s1"
    )
    source.start(received.append)
    try:
        assert source.subscribed.wait(10), "the source did not subscribe"
        payload = json.dumps(TELEMETRY)
        sensor.publish("edgewatch/sensors/pump-01/telemetry", payload, qos=1).wait_for_publish(10)
        assert wait_for(lambda: len(allowed.topics()) == 1)
        # Round trip on the source's own connection (see Subscriber.round_trip): gw-01 may write there.
        client = source._client
        assert client is not None
        client.publish("edgewatch/gw-01/ping", b"ping", qos=1).wait_for_publish(10)
        assert received == []
    finally:
        source.stop()
        sensor.disconnect()
        sensor.loop_stop()
        allowed.close()


# -- no insecure switch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["tls_insecure", "insecure", "tls_verify", "verify", "tls_check_hostname", "check_hostname", "cert_reqs"],
)
def test_no_insecure_tls_switch_is_accepted(key: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        MqttConnectionConfig.model_validate({"tls": True, key: "verify" not in key})  # the insecure value
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        UplinkConfig.model_validate({"mqtt": {"tls": True, key: "verify" not in key}})
    assert not any(
        word in name
        for name in MqttConnectionConfig.model_fields
        for word in ("insecure", "verify", "hostname")
    )


@pytest.mark.parametrize(
    "example", sorted((AGENT_DIR.parent / "examples").glob("*.toml")), ids=lambda p: p.name
)
def test_example_configs_hold_no_secret_and_verify_tls(example: Path, tmp_path: Path) -> None:
    """What operators copy must model the safe setup: no literal password, TLS off the machine."""
    filled = tmp_path / example.name  # the demo is a template: fill its placeholders (examples/demo.toml)
    values = {"PORT": "1883", "UPLINK": "true", "STATE": str(tmp_path), "PTY": "/dev/ttyS0"}
    filled.write_text(re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], example.read_text()))
    config = load_config(filled)
    conns = config.mqtt_connections()
    assert conns, f"{example.name} has no MQTT connection to check"
    for where, conn in conns.items():
        assert conn.password is None, f"{example.name} {where}: literal password"
        assert conn.tls or is_loopback(conn.host), f"{example.name} {where}: plain MQTT to {conn.host}"


@pytest.mark.parametrize("host", ["broker.example.net", "10.0.0.5", "fd00::5"])
@pytest.mark.parametrize("secret", [{"password_env": "EW_PW"}, {"password_credential": "mqtt-password"}])
def test_no_password_in_clear_text_over_the_network(host: str, secret: dict[str, str]) -> None:
    """Without TLS a password would cross the network readable by anyone on the path: refused."""
    with pytest.raises(ValidationError, match="clear text"):
        MqttConnectionConfig(host=host, username="gw-01", **secret)
    with pytest.raises(ValidationError, match="clear text"):
        UplinkConfig.model_validate({"mqtt": {"host": host, "username": "gw-01", **secret}})
    assert MqttConnectionConfig(host=host, username="gw-01", tls=True, **secret).tls
    assert MqttConnectionConfig(host=host, username="gw-01").password is None  # a user name alone is fine


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "::1"])
def test_plain_password_allowed_to_a_loopback_broker(host: str) -> None:
    """A broker on the gateway itself (sensors publishing locally) needs no TLS: loopback never leaves."""
    assert MqttConnectionConfig(host=host, username="gw-01", password_env="EW_PW").host == host


def test_every_tls_context_verifies_the_server(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    shutil.copy(pki.client.key, tmp_path / "key")
    configs = [
        MqttConnectionConfig(tls=True),
        MqttConnectionConfig(tls=True, tls_ca_file=pki.ca.cert),
        MqttConnectionConfig(
            tls=True, tls_ca_file=pki.ca.cert, tls_cert_file=pki.client.cert, tls_key_file=pki.client.key
        ),
        MqttConnectionConfig(tls=True, tls_cert_file=pki.client.cert, tls_key_credential="key"),
    ]
    for conn in configs:
        ctx = conn.ssl_context()
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is True
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


# -- nothing is unpickled, nothing turns verification off -----------------------------------------

FORBIDDEN = {
    "pickle (arbitrary code on load)": r"\b(?:c?pickle|dill|shelve)\b",
    "joblib (pickle underneath)": r"\bjoblib\b",
    "torch.load (pickle underneath; no torch on the gateway)": r"\btorch\s*\.\s*load\b",
    "numpy.load with allow_pickle=True": r"\ballow_pickle\s*=\s*True\b",
    "marshal.loads": r"\bmarshal\b",
    "TLS verification turned off": r"CERT_NONE|check_hostname\s*=\s*False|tls_insecure_set|_create_unverified_context",
}


def forbidden_uses(text: str) -> list[str]:
    return [what for what, pattern in FORBIDDEN.items() if re.search(pattern, text)]


def test_scanner_catches_each_forbidden_pattern() -> None:
    """The scan below is only worth something if it can fail."""
    samples = {
        "import pickle": "pickle",
        "from joblib import load": "joblib",
        "m = torch.load(path)": "torch.load",
        "np.load(f,\n        allow_pickle=True)": "allow_pickle",
        "import marshal": "marshal",
        "ctx.verify_mode = ssl.CERT_NONE": "TLS",
        "client.tls_insecure_set(True)": "TLS",
    }
    for text, expect in samples.items():
        found = forbidden_uses(text)
        assert found and expect in found[0], (text, found)
    assert (
        forbidden_uses("np.load(f)  # allow_pickle defaults to False\nonnxruntime.InferenceSession(p)") == []
    )


def test_agent_never_unpickles_or_disables_tls_verification() -> None:
    """Model bundles are ONNX + JSON only; a pickle-based loader would run code from a tampered bundle."""
    files = sorted(AGENT_DIR.rglob("*.py"))
    assert len(files) > 10, f"agent sources not found under {AGENT_DIR}"
    hits = {str(p.relative_to(AGENT_DIR.parent)): forbidden_uses(p.read_text()) for p in files}
    assert {p: h for p, h in hits.items() if h} == {}
