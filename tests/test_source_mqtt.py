"""MqttSource against a real mosquitto: receives telemetry, and resubscribes after a broker restart."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import Collector

from agent.mqtt_client import MqttConnectionConfig, make_client
from agent.parse import parse
from agent.source import MqttSource, MqttSourceConfig, make_source
from agent.types import Reading


def telemetry(device: str, seq: int) -> bytes:
    return json.dumps(
        {"v": 1, "device": device, "seq": seq, "ts": 1764806400000 + seq, "values": {"temperature": 40.0}}
    ).encode()


def publish(broker, topic: str, payload: bytes) -> None:
    conn = MqttConnectionConfig(host=broker.host, port=broker.port)
    pub = make_client(conn, f"test-pub-{time.monotonic_ns()}", clean_start=True)
    ready = threading.Event()
    pub.on_connect = lambda *a: ready.set()
    pub.loop_start()
    assert ready.wait(10)
    pub.publish(topic, payload, qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()


def source_for(broker, **kw) -> MqttSource:
    cfg = MqttSourceConfig(
        type="mqtt",
        mqtt={"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        client_id="edgewatch-test-ingest",
        **kw,
    )
    src = make_source(cfg)
    assert isinstance(src, MqttSource)
    return src


@pytest.mark.timeout(30)
def test_receives_telemetry_on_the_configured_prefix(broker) -> None:
    src = source_for(broker)
    got = Collector()
    src.start(got)
    try:
        assert src.subscribed.wait(10)
        publish(broker, "edgewatch/sensors/pump-01/telemetry", telemetry("pump-01", 1))
        publish(broker, "edgewatch/sensors/pump-01/status", b"not telemetry")  # not subscribed
        publish(broker, "other/pump-01/telemetry", b"other prefix")
        publish(broker, "edgewatch/sensors/fan-02/telemetry", telemetry("fan-02", 2))
        msgs = got.wait_for(2)
        time.sleep(0.2)
        assert [m.origin for m in got.items] == [
            "edgewatch/sensors/pump-01/telemetry",
            "edgewatch/sensors/fan-02/telemetry",
        ]
        assert all(m.kind == "mqtt" for m in msgs)
        r = parse(msgs[0])
        assert isinstance(r, Reading) and r.device == "pump-01"
    finally:
        src.stop()


@pytest.mark.timeout(60)
def test_resubscribes_after_broker_restart(broker) -> None:
    """The broker has persistence off: after a restart the session is gone and only a resubscribe helps."""
    src = source_for(broker, topic_prefix="plant/a")
    got = Collector()
    src.start(got)
    try:
        assert src.subscribed.wait(10)
        publish(broker, "plant/a/pump-01/telemetry", telemetry("pump-01", 1))
        got.wait_for(1)
        broker.stop()
        deadline = time.monotonic() + 10
        while src.subscribed.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not src.subscribed.is_set()
        broker.start()  # same port
        assert src.subscribed.wait(20), "no resubscription after the broker came back"
        assert src.connects == 2
        publish(broker, "plant/a/pump-01/telemetry", telemetry("pump-01", 2))
        msgs = got.wait_for(2)
        assert msgs[-1].payload == telemetry("pump-01", 2)
    finally:
        src.stop()


@pytest.mark.timeout(60)
def test_burst_arrives_in_order_and_every_message_is_acknowledged(broker) -> None:
    """The source reads many packets per wake-up and writes their PUBACKs together: a burst at QoS 1 must
    arrive complete and in order, and the broker must have every PUBACK, so the persistent session holds
    nothing to redeliver when the same client id connects again."""
    n = 2000
    src = source_for(broker)
    got = Collector()
    src.start(got)
    conn = MqttConnectionConfig(host=broker.host, port=broker.port)
    pub = make_client(conn, "test-pub-burst", clean_start=True)
    ready = threading.Event()
    pub.on_connect = lambda *a: ready.set()
    pub.loop_start()
    try:
        assert src.subscribed.wait(10) and ready.wait(10)
        infos = [
            pub.publish("edgewatch/sensors/pump-01/telemetry", telemetry("pump-01", i), qos=1)
            for i in range(n)
        ]
        for info in infos:
            info.wait_for_publish(20)
        msgs = got.wait_for(n, timeout=30)
        assert [json.loads(m.payload)["seq"] for m in msgs] == list(range(n))
    finally:
        pub.disconnect()
        pub.loop_stop()
        src.stop()
    assert len(got.items) == n
    # Same client id, persistent session: anything not acknowledged would be sent again now.
    again = source_for(broker)
    got2 = Collector()
    again.start(got2)
    try:
        assert again.subscribed.wait(10)
        publish(broker, "edgewatch/sensors/pump-01/telemetry", telemetry("pump-01", n))  # a marker
        msgs = got2.wait_for(1)
        time.sleep(0.3)
        assert [json.loads(m.payload)["seq"] for m in got2.items] == [n], (
            "unacknowledged messages redelivered"
        )
    finally:
        again.stop()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("qos", [0, 1])
def test_batched_reads_keep_every_payload_topic_and_order(broker, protocol: str, qos: int) -> None:
    """The source cuts PUBLISH packets itself (topic, packet id, MQTT 5 properties skipped) out of large
    reads and hands each read to `sink_many`: every payload must arrive byte for byte, on its topic, in
    order, across packet sizes whose remaining length takes 1 to 2 bytes and reads that end mid-packet;
    at QoS 1 every message must be acknowledged (nothing redelivered to the same session)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    n = 600
    payloads = [telemetry(f"pump-{i % 7:02d}", i) + b" " * (i * 7 % 4000) for i in range(n)]
    src = source_for(broker, qos=qos)
    src.config.mqtt.protocol = protocol
    got = Collector()
    src.start(got, got.many)
    conn = MqttConnectionConfig(host=broker.host, port=broker.port)  # MQTT 5 publisher: properties on
    pub = make_client(conn, "test-pub-batched", clean_start=True)
    ready = threading.Event()
    pub.on_connect = lambda *a: ready.set()
    pub.loop_start()
    try:
        assert src.subscribed.wait(10) and ready.wait(10)
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("fw", "1.2.3")
        props.ContentType = "application/json"
        infos = [
            pub.publish(f"edgewatch/sensors/pump-{i % 7:02d}/telemetry", p, qos=1, properties=props)
            for i, p in enumerate(payloads)
        ]
        for info in infos:
            info.wait_for_publish(20)
        msgs = got.wait_for(n, timeout=30)
        assert [m.payload for m in msgs] == payloads
        assert [m.origin for m in msgs] == [f"edgewatch/sensors/pump-{i % 7:02d}/telemetry" for i in range(n)]
        assert all(m.kind == "mqtt" and m.received > 0 for m in msgs)
        assert got.batches < n  # reads were handed over in groups, not one call per message
    finally:
        pub.disconnect()
        pub.loop_stop()
        src.stop()
    if qos == 1:
        again = source_for(broker, qos=qos)
        again.config.mqtt.protocol = protocol
        got2 = Collector()
        again.start(got2, got2.many)
        try:
            assert again.subscribed.wait(10)
            publish(broker, "edgewatch/sensors/pump-01/telemetry", telemetry("pump-01", n))  # a marker
            got2.wait_for(1)
            time.sleep(0.3)
            assert [json.loads(m.payload)["seq"] for m in got2.items] == [n], (
                "unacknowledged messages redelivered"
            )
        finally:
            again.stop()


@pytest.mark.timeout(30)
def test_stop_while_the_broker_is_unreachable_ends_the_thread(broker) -> None:
    src = source_for(broker)
    broker.stop()
    src.start(Collector())
    time.sleep(0.5)  # inside its reconnect backoff
    thread = src._thread
    src.stop()
    assert thread is not None and not thread.is_alive()
    broker.start()


def test_topic_prefix_must_be_plain() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="no wildcards"):
        MqttSourceConfig(type="mqtt", topic_prefix="a/+/b")
    assert MqttSourceConfig(type="mqtt").topic == "edgewatch/sensors/+/telemetry"
