"""End to end, with every part real: the simulator on a pty or over MQTT, `edgewatch run` as a
process on the shipped model, a mosquitto started here, and a subscriber that checks the payloads
against the published JSON Schemas."""

from __future__ import annotations

import json
import signal  # noqa: F401
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_proc import (
    EDGEWATCH,
    MODEL,
    Subscriber,
    agent_on_sim_pty,
    is_open_alert,
    schema,
    start_agent,
    stop,
    write_config,
)
from conftest import Broker, free_port

from firmware_sim.wire import encode_json_batch


@pytest.mark.timeout(180)
def test_serial_fault_raises_an_alert_that_reaches_the_broker(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    sub = Subscriber(broker)
    agent, _pty = agent_on_sim_pty(
        broker, tmp_path, procs,
        "--seed", "7", "--devices", "2", "--speed", "50", "--scenario", "bearing_wear",
        "--fault-after", "300", "--degradation", "600",
    )  # fmt: skip
    try:
        _, status = sub.wait_for(lambda t, p: t == "edgewatch/gw-test/status" and p["state"] == "online", 30)
        assert not list(schema("status").iter_errors(status))
        topic, alert = sub.wait_for(is_open_alert("pump-01"), 120)
    finally:
        sub.close()
    assert topic == "edgewatch/gw-test/pump-01/alert"
    assert not list(schema("alert").iter_errors(alert)), list(schema("alert").iter_errors(alert))
    assert alert["top_sensors"][0]["channel"] == "vibration"  # bearing wear is a vibration fault
    assert alert["score"] > alert["threshold"]
    assert stop(agent) == 0, (tmp_path / "agent.log").read_text()[-2000:]
    # the alert was stored, and readings were committed before exit
    with sqlite3.connect(tmp_path / "state" / "edgewatch.db") as db:
        assert (
            db.execute("SELECT count(*) FROM alerts WHERE alert_id = ?", [alert["alert_id"]]).fetchone()[0]
            == 1
        )
        assert db.execute("SELECT count(*) FROM readings WHERE device = 'pump-02'").fetchone()[0] > 100


@pytest.mark.timeout(180)
def test_mqtt_telemetry_to_alert(broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    sub = Subscriber(broker, "edgewatch/gw-test/#")
    source = (
        '[[sources]]\ntype = "mqtt"\nname = "plant"\n'
        f'[sources.mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
    )
    cfg = write_config(tmp_path / "ew.toml", tmp_path / "state", broker, source)
    agent = start_agent(cfg, tmp_path / "agent.log")
    procs.append(agent)
    try:
        sub.wait_for(lambda t, p: t == "edgewatch/gw-test/status" and p["state"] == "online", 30)
        sim = subprocess.Popen(
            [EDGEWATCH, "sim", "mqtt", "--broker", broker.address, "--seed", "8", "--devices", "1",
             "--speed", "50", "--scenario", "imbalance", "--fault-after", "300", "--degradation", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(sim)
        _, alert = sub.wait_for(is_open_alert("pump-01"), 120)
    finally:
        sub.close()
    assert not list(schema("alert").iter_errors(alert))
    assert alert["gateway"] == "gw-test"
    assert stop(agent) == 0


@pytest.mark.timeout(240)
def test_restart_continues_the_open_alert_and_threshold(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    """SIGTERM while an alert is open, start again on the same state: updates carry the same id, no new open."""
    sub = Subscriber(broker, "edgewatch/gw-test/+/alert")
    agent, _pty = agent_on_sim_pty(
        broker, tmp_path, procs,
        "--seed", "7", "--devices", "1", "--speed", "40", "--scenario", "bearing_wear",
        "--fault-after", "300", "--degradation", "3000", log="a1.log",
    )  # fmt: skip
    try:
        _, first = sub.wait_for(is_open_alert("pump-01"), 120)
        assert stop(agent) == 0
        db_path = tmp_path / "state" / "edgewatch.db"
        with sqlite3.connect(db_path) as db:
            saved = dict(db.execute("SELECT key, value_json FROM state").fetchall())
        assert "threshold:pump-01" in saved
        time.sleep(1.0)
        before: list[dict] = []
        while not sub.messages.empty():
            before.append(sub.messages.get()[1])
        last_n = max(
            int(p["msg_id"].split(":")[1]) for p in [first, *before] if p["alert_id"] == first["alert_id"]
        )
        agent2 = start_agent(tmp_path / "ew.toml", tmp_path / "a2.log")
        procs.append(agent2)
        after: list[dict] = []
        sub.wait_for(lambda t, p: after.append(p) or int(p["msg_id"].split(":")[1]) > last_n, 120)
        # every alert message after the restart belongs to the alert opened before it
        assert {p["alert_id"] for p in after} == {first["alert_id"]}, after
        assert after[-1]["state"] in ("update", "resolve")
        assert stop(agent2) == 0
    finally:
        sub.close()
    log2 = (tmp_path / "a2.log").read_text()
    assert "Traceback" not in log2, log2[-3000:]


def test_agent_never_imports_torch(tmp_path: Path) -> None:
    """The gateway path (config, bundle, scoring, pipeline, replay) runs without torch or training/."""
    script = f"""
import sys, json
from agent.replay import replay, load_inputs
from agent.pipeline import StageSettings, build_pipeline
from agent.bundle import load_bundle
from agent.db import open_db
import agent.service, agent.cli
b = load_bundle({str(MODEL)!r})
import subprocess
subprocess.run([{EDGEWATCH!r}, "sim", "record", "--out", {str(tmp_path / "r.csv")!r}, "--devices", "1",
                "--duration", "600"], check=True, capture_output=True)
recs = load_inputs([{str(tmp_path / "r.csv")!r}], b.manifest.channel_names)
db = open_db({str(tmp_path / "r.db")!r})
res = replay(recs, lambda e, j: build_pipeline(StageSettings(), b, db, e, on_judgement=j))
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training", "sklearn", "matplotlib"))
print(json.dumps({{"windows": len(res.judgements), "bad": bad}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["windows"] > 5  # scored windows: the default screen scores every 8th of ~67
    assert result["bad"] == []


@pytest.mark.timeout(120)
def test_garbage_on_the_wire_is_a_health_event(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    sub = Subscriber(broker, "edgewatch/gw-test/+/health")
    agent, pty = agent_on_sim_pty(
        broker, tmp_path, procs,
        "--seed", "5", "--devices", "1", "--speed", "20", "--scenario", "sensor_garbage", "--fault-after", "60",
    )  # fmt: skip
    try:
        _, event = sub.wait_for(lambda t, p: p["kind"] == "garbage" and p["state"] == "raised", 90)
    finally:
        sub.close()
    assert not list(schema("health").iter_errors(event))
    assert event["device"] in (pty, "pump-01"), event  # unparseable lines are attributed to the port
    assert stop(agent) == 0


@pytest.mark.timeout(120)
def test_mqtt_batch_with_one_bad_element_stores_the_rest_and_counts_one_reject(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    """A batch payload of N readings, one malformed, through mosquitto into `edgewatch run`: N-1
    readings land in SQLite in order, and exactly one reject is counted, by its reason."""
    mport = free_port()
    source = (
        '[[sources]]\ntype = "mqtt"\nname = "plant"\n'
        f'[sources.mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
    )
    cfg = write_config(tmp_path / "ew.toml", tmp_path / "state", broker, source)
    cfg.write_text(
        cfg.read_text().replace(
            "[metrics]\nenabled = false", f'[metrics]\nenabled = true\nhost = "127.0.0.1"\nport = {mport}'
        )
    )
    agent = start_agent(cfg, tmp_path / "agent.log")
    procs.append(agent)

    def metric(name: str) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and "_created" not in line
        }

    deadline = time.monotonic() + 30
    while "MQTT source plant connected" not in (tmp_path / "agent.log").read_text():
        assert time.monotonic() < deadline and agent.poll() is None, (tmp_path / "agent.log").read_text()
        time.sleep(0.05)
    time.sleep(0.5)  # the subscription follows the CONNACK
    n = 20
    t0 = int(time.time() * 1000) - 60_000
    rows = [(i, t0 + 1000 * i, 41.0 + i / 100, 2.0, 3.2) for i in range(n)]
    payload = encode_json_batch("pump-01", rows)
    assert b'"seq":7,' in payload
    payload = payload.replace(b'"seq":7,', b'"seq":-7,')  # element 7 breaks a schema rule
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-batch-pub")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        pub.publish("edgewatch/sensors/pump-01/telemetry", payload, qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 20
        while sum(metric("edgewatch_readings_accepted_total").values()) < n - 1:
            assert time.monotonic() < deadline, metric("edgewatch_readings")
            time.sleep(0.1)
        time.sleep(0.3)  # nothing else may follow
        rejected = {k: v for k, v in metric("edgewatch_readings_rejected_total").items() if v}
        assert rejected == {'edgewatch_readings_rejected_total{reason="schema"}': 1.0}
        assert sum(metric("edgewatch_readings_accepted_total").values()) == n - 1
    finally:
        pub.loop_stop()
        pub.disconnect()
    assert stop(agent) == 0, (tmp_path / "agent.log").read_text()[-2000:]
    assert "batch[7]: seq out of range" in (tmp_path / "agent.log").read_text()  # the logged reject
    with sqlite3.connect(tmp_path / "state" / "edgewatch.db") as db:
        stored = db.execute("SELECT seq, ts FROM readings WHERE device = 'pump-01' ORDER BY rowid").fetchall()
    assert stored == [(i, (t0 + 1000 * i) / 1000) for i in range(n) if i != 7]
