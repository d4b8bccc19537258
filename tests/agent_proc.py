"""Helpers for tests that run the real processes: the simulator, `edgewatch run`, a subscriber."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
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


def is_open_alert(device: str):  # type: ignore[no-untyped-def]
    return lambda topic, p: topic.endswith(f"/{device}/alert") and p.get("state") == "open"


def serial_source(pty: str) -> str:
    return f'[[sources]]\ntype = "serial"\nname = "bus"\nport = "{pty}"'


def agent_on_sim_pty(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen], *sim_args: str, log: str = "agent.log"
) -> tuple[subprocess.Popen, str]:
    """The simulator on a new pty with `sim_args`, and `edgewatch run` reading it (config in
    tmp_path/ew.toml, state in tmp_path/state): returns (agent, pty path)."""
    sim, pty = start_sim_pty(*sim_args)
    procs.append(sim)
    cfg = write_config(tmp_path / "ew.toml", tmp_path / "state", broker, serial_source(pty))
    agent = start_agent(cfg, tmp_path / log)
    procs.append(agent)
    return agent, pty
