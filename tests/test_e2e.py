"""End to end, with every part real: the simulator on a pty or over MQTT, `edgewatch run` as a
process on the shipped model, a mosquitto started here, and a subscriber that checks the payloads
against the published JSON Schemas."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from conftest import Broker

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EDGEWATCH = str(BIN / "edgewatch")
MODEL = ROOT / "models" / "default"


def schema(name: str) -> jsonschema.Draft202012Validator:
    doc = json.loads(resources.files("agent").joinpath("schemas", f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(doc)


class Subscriber:
    """Collects everything under edgewatch/# from the broker."""

    def __init__(self, broker: Broker, topic: str = "edgewatch/#") -> None:
        self.messages: queue.Queue[tuple[str, dict]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{os.getpid()}")
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, json.loads(m.payload)))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def wait_for(self, pred, timeout: float) -> tuple[str, dict]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                topic, payload = self.messages.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append((topic, payload))
            if pred(topic, payload):
                return topic, payload
        raise AssertionError(f"no matching message within {timeout} s; saw {[t for t, _ in seen][-10:]}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def start_sim_pty(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [EDGEWATCH, "sim", "serial", "--pty", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.startswith("serial port: "), (line, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
    return proc, line.split(": ", 1)[1].strip()


def write_config(path: Path, state: Path, broker: Broker, source: str) -> Path:
    path.write_text(
        f"""
[gateway]
id = "gw-test"
state_dir = "{state}"

{source}

[model]
path = "{MODEL}"

[uplink]
console = false
shutdown_flush_s = 3

[uplink.mqtt]
host = "127.0.0.1"
port = {broker.port}
reconnect_max_s = 2

[metrics]
enabled = false
"""
    )
    return path


def start_agent(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [EDGEWATCH, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=open(log, "w")
    )


def stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def is_open_alert(device: str):  # type: ignore[no-untyped-def]
    return lambda topic, p: topic.endswith(f"/{device}/alert") and p.get("state") == "open"


@pytest.mark.timeout(180)
def test_serial_fault_raises_an_alert_that_reaches_the_broker(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    sub = Subscriber(broker)
    sim, pty = start_sim_pty(
        "--seed", "7", "--devices", "2", "--speed", "50", "--scenario", "bearing_wear",
        "--fault-after", "300", "--degradation", "600",
    )  # fmt: skip
    procs.append(sim)
    source = f'[[sources]]\ntype = "serial"\nname = "bus"\nport = "{pty}"'
    cfg = write_config(tmp_path / "ew.toml", tmp_path / "state", broker, source)
    agent = start_agent(cfg, tmp_path / "agent.log")
    procs.append(agent)
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
    sim, pty = start_sim_pty(
        "--seed", "7", "--devices", "1", "--speed", "40", "--scenario", "bearing_wear",
        "--fault-after", "300", "--degradation", "3000",
    )  # fmt: skip
    procs.append(sim)
    source = f'[[sources]]\ntype = "serial"\nname = "bus"\nport = "{pty}"'
    cfg = write_config(tmp_path / "ew.toml", tmp_path / "state", broker, source)
    agent = start_agent(cfg, tmp_path / "a1.log")
    procs.append(agent)
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
        agent2 = start_agent(cfg, tmp_path / "a2.log")
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
    assert result["windows"] > 50
    assert result["bad"] == []
