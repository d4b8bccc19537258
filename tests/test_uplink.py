"""Uplink against a real mosquitto: outage buffering, delete-on-PUBACK, resend after restart, status/will."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker, make_broker

from agent import metrics
from agent.types import Event
from agent.uplink import Outbox, Uplink, UplinkConfig

REPO = Path(__file__).resolve().parents[1]


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


class Subscriber:
    """A paho consumer recording (topic, payload dict, retain) for everything under `topic`."""

    def __init__(self, broker: Broker, topic: str, client_id: str = "", clean: bool = True) -> None:
        self.messages: list[tuple[str, dict, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean if client_id else True
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(5), "subscription not acknowledged"

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((m.topic, json.loads(m.payload), bool(m.retain)))

    def payloads(self, suffix: str = "") -> list[dict]:
        with self._lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def uplink_config(broker: Broker, **kw: object) -> UplinkConfig:
    mqtt_cfg = {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3}
    return UplinkConfig(mqtt=mqtt_cfg, **kw)


def alert(device: str, i: int) -> Event:
    return Event("alert", device, {"v": 1, "type": "alert", "msg_id": f"{device}:{i}", "seq": i})


@pytest.fixture
def up_factory(db_path: Path) -> Iterator[Callable[..., Uplink]]:
    made: list[Uplink] = []

    def make(broker: Broker, path: Path = db_path, **kw: object) -> Uplink:
        up = Uplink(uplink_config(broker, **kw), Outbox(path, uplink_config(broker, **kw)), "gw-01", status)
        made.append(up)
        return up

    yield make
    for up in made:
        up.stop(timeout=0.5)
        up.outbox.close()


def status() -> dict:
    return {"model_id": "default-0123abcd4567", "devices": ["pump-02", "pump-01"], "uptime_s": 12.0}


def sigstop(broker: Broker) -> None:
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)


def sigcont(broker: Broker) -> None:
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGCONT)


@pytest.mark.timeout(60)
def test_messages_put_while_broker_is_down_arrive_in_order_after_it_starts(
    tmp_path: Path, up_factory: Callable[..., Uplink]
) -> None:
    # A persistent broker and a persistent consumer session: the consumer is subscribed before the
    # broker goes down, so delivery after the restart does not race its subscription.
    store = tmp_path / "mosq"
    store.mkdir()
    # `user`: started as root, mosquitto would switch to its own user, which cannot write into tmp_path.
    conf = f"persistence true\npersistence_location {store}/\nuser {getpass.getuser()}\n"
    broker = make_broker(tmp_path, extra_conf=conf)
    broker.start()
    try:
        sub = Subscriber(broker, "edgewatch/gw-01/+/alert", client_id="consumer", clean=False)
        sub.close()
        broker.stop()

        up = up_factory(broker)
        up.start()
        events = [alert(f"pump-0{d}", i) for i in range(10) for d in (1, 2, 3)]
        assert all(up.enqueue(e) for e in events)
        assert wait_for(lambda: up._fail_streak >= 2)  # it really tried and failed to connect
        assert not up.connected
        assert up.outbox.depth() == 30

        broker.start()
        assert up.flush(15), f"outbox still holds {up.outbox.depth()}"
        sub = Subscriber(broker, "edgewatch/gw-01/+/alert", client_id="consumer", clean=False)
        assert wait_for(lambda: len(sub.payloads()) >= 30)
        got = sub.payloads()
        sub.close()
    finally:
        broker.stop()
    assert {p["msg_id"] for p in got} == {e.payload["msg_id"] for e in events}
    for d in ("pump-01", "pump-02", "pump-03"):
        seqs = [p["seq"] for p in got if p["msg_id"].startswith(d)]
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == list(range(10)), (d, seqs)


@pytest.mark.timeout(60)
def test_a_message_leaves_the_outbox_only_after_puback(
    broker: Broker, up_factory: Callable[..., Uplink]
) -> None:
    sub = Subscriber(broker, "edgewatch/gw-01/+/alert")
    up = up_factory(broker)
    acked_before = metrics.REGISTRY.get_sample_value("edgewatch_uplink_acked_total") or 0.0
    up.start()
    assert wait_for(lambda: up.connected)
    sigstop(broker)  # the TCP connection stays up; the broker just does not answer
    try:
        for i in range(5):
            assert up.enqueue(alert("pump-01", i))
        # Sent (written to the socket) but not acknowledged: still in the outbox.
        assert wait_for(lambda: all(r.attempts >= 1 for r in up.outbox.peek(10)) and up.outbox.depth() == 5)
        time.sleep(0.2)
        assert up.outbox.depth() == 5
        assert metrics.REGISTRY.get_sample_value("edgewatch_uplink_acked_total") == acked_before
    finally:
        sigcont(broker)
    assert up.flush(10)
    assert metrics.REGISTRY.get_sample_value("edgewatch_uplink_acked_total") - acked_before == 5
    assert metrics.REGISTRY.get_sample_value("edgewatch_outbox_depth") == 0
    assert wait_for(lambda: len(sub.payloads()) >= 5)
    assert [p["seq"] for p in sub.payloads()] == [0, 1, 2, 3, 4]
    sub.close()


@pytest.mark.timeout(60)
def test_restart_on_the_same_db_resends_what_was_not_acknowledged(
    broker: Broker, db_path: Path, up_factory: Callable[..., Uplink]
) -> None:
    sub = Subscriber(broker, "edgewatch/gw-01/+/alert")
    first = up_factory(broker)
    first.start()
    assert wait_for(lambda: first.connected)
    sigstop(broker)
    try:
        for i in range(5):
            first.enqueue(alert("pump-01", i))
        assert wait_for(lambda: all(r.attempts >= 1 for r in first.outbox.peek(10)))
        first.stop(timeout=0.3)  # the broker never acknowledges: nothing may be deleted
        assert first.outbox.depth() == 5
        first.outbox.close()
    finally:
        sigcont(broker)

    acked_before = metrics.REGISTRY.get_sample_value("edgewatch_uplink_acked_total") or 0.0
    second = up_factory(broker, db_path)
    assert [r.msg_id for r in second.outbox.peek(10)] == [f"pump-01:{i}" for i in range(5)]
    second.start()
    assert second.flush(10)
    assert metrics.REGISTRY.get_sample_value("edgewatch_uplink_acked_total") - acked_before == 5
    # The first instance's copies may also arrive once the broker resumes: duplicates share the msg_id.
    assert wait_for(lambda: len(sub.payloads()) >= 5)
    time.sleep(0.2)
    ids = [p["msg_id"] for p in sub.payloads()]
    assert set(ids) == {f"pump-01:{i}" for i in range(5)}
    assert 5 <= len(ids) <= 10
    sub.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["drop_oldest", "reject_new"])
def test_caps_apply_while_the_broker_is_down(
    tmp_path: Path, db_path: Path, up_factory: Callable[..., Uplink], policy: str
) -> None:
    broker = make_broker(tmp_path)  # never started: connection refused
    reason = "evicted" if policy == "drop_oldest" else "rejected"
    before = metrics.REGISTRY.get_sample_value("edgewatch_outbox_dropped_total", {"reason": reason}) or 0.0
    up = up_factory(broker, max_rows=20, drop_policy=policy)
    up.start()
    results = [up.enqueue(alert("pump-01", i)) for i in range(30)]
    assert up.outbox.depth() == 20
    kept = [r.msg_id for r in up.outbox.peek(50)]
    if policy == "drop_oldest":
        assert all(results)
        assert kept == [f"pump-01:{i}" for i in range(10, 30)]
    else:
        assert results == [True] * 20 + [False] * 10
        assert kept == [f"pump-01:{i}" for i in range(20)]
    assert (
        metrics.REGISTRY.get_sample_value("edgewatch_outbox_dropped_total", {"reason": reason}) - before == 10
    )
    assert up.outbox.dropped() == 10
    assert up.status_payload("online")["outbox"] == {"depth": 20, "dropped": 10}
    up.stop(timeout=0.5)
    up.outbox.close()
    assert Outbox(db_path).dropped() == 10  # persisted in `counters`


@pytest.mark.timeout(60)
def test_retained_online_status_heartbeat_and_clean_offline(
    broker: Broker, up_factory: Callable[..., Uplink]
) -> None:
    up = up_factory(broker)
    up.start()
    assert wait_for(lambda: up.connected)
    # A consumer arriving later still learns the state: the status is retained.
    sub = Subscriber(broker, "edgewatch/gw-01/status")
    assert wait_for(lambda: len(sub.messages) >= 1)
    topic, first, retained = sub.messages[0]
    assert topic == "edgewatch/gw-01/status" and retained
    assert first["state"] == "online"
    assert first["devices"] == ["pump-01", "pump-02"]
    assert first["model_id"] == "default-0123abcd4567"
    up.publish_status()
    assert wait_for(lambda: len(sub.messages) >= 2)
    assert sub.messages[1][1]["ts"] >= first["ts"]
    assert sub.messages[1][1]["msg_id"].startswith("status:gw-01:")
    up.stop(timeout=2.0)
    assert wait_for(lambda: any(p["state"] == "offline" for _, p, _ in sub.messages))
    sub.close()
    late = Subscriber(broker, "edgewatch/gw-01/status")
    assert wait_for(lambda: len(late.messages) >= 1)
    assert late.messages[0][1]["state"] == "offline" and late.messages[0][2]
    late.close()


CRASHER = textwrap.dedent(
    """
    import sys, time
    from agent.uplink import Outbox, Uplink, UplinkConfig
    port, db = int(sys.argv[1]), sys.argv[2]
    cfg = UplinkConfig(mqtt={"host": "127.0.0.1", "port": port, "keepalive": 60})
    up = Uplink(cfg, Outbox(db, cfg), "gw-01", lambda: {"model_id": None, "devices": ["pump-01"]})
    up.start()
    while not up.connected:
        time.sleep(0.01)
    print("connected", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.timeout(60)
def test_last_will_reports_offline_when_the_agent_dies(broker: Broker, db_path: Path) -> None:
    sub = Subscriber(broker, "edgewatch/gw-01/status")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(broker.port), str(db_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        assert wait_for(lambda: [p["state"] for p in sub.payloads()] == ["online"])
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
        proc.wait(5)
        assert wait_for(lambda: len(sub.payloads()) >= 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    will = sub.payloads()[1]
    assert will["state"] == "offline"
    assert will["gateway"] == "gw-01" and will["devices"] == ["pump-01"] and will["model_id"] is None
    sub.close()


@pytest.mark.timeout(60)
def test_unacknowledged_messages_are_resent_after_the_broker_dies(
    broker: Broker, up_factory: Callable[..., Uplink]
) -> None:
    up = up_factory(broker)
    up.start()
    assert wait_for(lambda: up.connected)
    sigstop(broker)
    for i in range(5):
        up.enqueue(alert("pump-01", i))
    assert wait_for(lambda: all(r.attempts >= 1 for r in up.outbox.peek(10)) and up.outbox.depth() == 5)
    assert broker.proc is not None
    broker.proc.kill()  # the broker dies holding the messages, none acknowledged
    broker.proc.wait()
    broker.proc = None
    assert wait_for(lambda: not up.connected)
    assert up.outbox.depth() == 5

    acked_before = metrics.REGISTRY.get_sample_value("edgewatch_uplink_acked_total") or 0.0
    broker.start()  # a fresh broker on the same port: it knows nothing of the lost messages
    assert up.flush(15)
    assert metrics.REGISTRY.get_sample_value("edgewatch_uplink_acked_total") - acked_before == 5
    # The reconnect also re-established the retained online status on the new broker.
    sub = Subscriber(broker, "edgewatch/gw-01/status")
    assert wait_for(lambda: len(sub.messages) >= 1)
    assert sub.messages[0][1]["state"] == "online" and sub.messages[0][2]
    sub.close()
