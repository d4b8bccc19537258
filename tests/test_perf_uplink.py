"""The uplink thread is woken by new work instead of polling (issue #6 follow-up: alert latency).

The idle wait is raised to a minute here, so each test can only pass if the wake-up works: without it
a message or a stop would sit for 60 s, far beyond these tests' waits.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker

from agent import uplink as uplink_mod
from agent.types import Event
from agent.uplink import Outbox, Uplink, UplinkConfig

WAIT_S = 20.0  # a third of the idle wait below: generous for a loaded CI box, far below a missed wake-up


@pytest.fixture(autouse=True)
def long_idle_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uplink_mod, "IDLE_WAIT_S", 60.0)


class Sub:
    """Collects alert payloads under the gateway's topics, in arrival order."""

    def __init__(self, broker: Broker) -> None:
        self.got: list[dict] = []
        self.cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *a: c.subscribe("edgewatch/gw-perf/+/alert", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(5), "subscription not acknowledged"

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.got.append(json.loads(m.payload))
            self.cond.notify_all()

    def wait_for(self, n: int) -> list[dict]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, WAIT_S)
            return list(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sub(broker: Broker) -> Iterator[Sub]:
    s = Sub(broker)
    yield s
    s.close()


@pytest.fixture
def up(broker: Broker, db_path: Path) -> Iterator[Uplink]:
    cfg = UplinkConfig(mqtt={"host": broker.host, "port": broker.port})
    u = Uplink(cfg, Outbox(db_path, cfg), "gw-perf")
    yield u
    u.stop(timeout=0.5)
    u.outbox.close()


def alert(device: str, i: int) -> Event:
    return Event("alert", device, {"v": 1, "type": "alert", "msg_id": f"{device}:{i}", "seq": i})


@pytest.mark.timeout(60)
def test_each_enqueue_wakes_the_idle_uplink_and_order_holds(up: Uplink, sub: Sub) -> None:
    up.start()
    assert up._connected.wait(10), "uplink did not connect"
    # One at a time, each after the previous arrived: every one must be sent by its own wake-up.
    for i in range(3):
        assert up.enqueue(alert("pump-01", i))
        assert len(sub.wait_for(i + 1)) == i + 1, f"message {i} not delivered without polling"
    # A burst from two devices keeps the enqueue order (per device and overall).
    burst = [alert(f"pump-0{1 + i % 2}", 10 + i) for i in range(30)]
    for ev in burst:
        assert up.enqueue(ev)
    got = sub.wait_for(33)
    assert [p["msg_id"] for p in got] == [f"pump-01:{i}" for i in range(3)] + [
        ev.payload["msg_id"] for ev in burst
    ]
    assert up.flush(WAIT_S), "acknowledged rows must be deleted from the outbox"


@pytest.mark.timeout(60)
def test_stop_wakes_the_idle_uplink_and_closes_the_wake_pair(up: Uplink, sub: Sub) -> None:
    up.start()
    assert up._connected.wait(10), "uplink did not connect"
    thread = up._thread
    assert thread is not None
    # Let the thread go idle first: its last traffic (this message's PUBACK) is processed.
    assert up.enqueue(alert("pump-01", 0))
    assert len(sub.wait_for(1)) == 1
    assert up.flush(WAIT_S)
    up.stop(timeout=WAIT_S)
    assert not thread.is_alive()
    assert up._wake_r is None and up._wake_w is None
    # Enqueue while stopped only stores (no pair to write to); a restart sends it.
    assert up.enqueue(alert("pump-01", 1))
    assert up.outbox.depth() == 1
    up.start()
    assert [p["msg_id"] for p in sub.wait_for(2)] == ["pump-01:0", "pump-01:1"]
