"""Uplink outage: the upstream broker goes away while the agent keeps raising alerts, long enough to fill
the outbox past a small row cap, and comes back. What fitted in the outbox is delivered in order per
device, the drop policy chose what went, and the drops are counted in the database, in Prometheus and
in the status message. (The MQTT source's resubscribe after a broker restart and the serial source's
reopen of a vanished port are tested in tests/test_source_mqtt.py and tests/test_source_serial.py.)
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest
from agent_proc import MODEL, Subscriber, start_agent, start_sim_pty, stop
from conftest import Broker, free_port

MAX_ROWS = 4


def outage_config(path: Path, state: Path, broker: Broker, pty: str, metrics_port: int, policy: str) -> Path:
    path.write_text(
        f"""
[gateway]
id = "gw-test"
state_dir = "{state}"

[[sources]]
type = "serial"
name = "bus"
port = "{pty}"

[model]
path = "{MODEL}"

[health]
silence_s = 3600  # the input stops before the outbox is read: no 'silent' event may join it

[alerts]
open_k = 3
open_n = 5
update_every = 2

[uplink]
max_rows = {MAX_ROWS}
drop_policy = "{policy}"
shutdown_flush_s = 3

[uplink.mqtt]
host = "127.0.0.1"
port = {broker.port}
reconnect_min_s = 3.0
reconnect_max_s = 4

[metrics]
enabled = true
host = "127.0.0.1"
port = {metrics_port}
"""
    )
    return path


def counter(db_path: Path, name: str) -> int:
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as db:
        row = db.execute("SELECT value FROM counters WHERE name = ?", [name]).fetchone()
    return row[0] if row else 0


def outbox_rows(db_path: Path) -> list[tuple[int, str, str]]:
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as db:
        return db.execute("SELECT id, device, msg_id FROM outbox ORDER BY id").fetchall()


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("policy", ["drop_oldest", "reject_new"])
def test_outage_past_the_cap_delivers_what_fits_in_order_and_counts_drops(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen], policy: str
) -> None:
    sim, pty = start_sim_pty(
        "--seed", "7", "--devices", "2", "--speed", "100", "--scenario", "bearing_wear",
        "--fault-after", "500", "--degradation", "900",
    )  # fmt: skip
    procs.append(sim)
    mport = free_port()
    state = tmp_path / "state"
    db_path = state / "edgewatch.db"
    cfg = outage_config(tmp_path / "ew.toml", state, broker, pty, mport, policy)
    model = shutil.copytree(MODEL, tmp_path / "model")  # the shipped model may be regenerated meanwhile
    cfg.write_text(cfg.read_text().replace(str(MODEL), str(model)))
    sub = Subscriber(broker, "edgewatch/gw-test/#")
    agent = start_agent(cfg, tmp_path / "agent.log")
    procs.append(agent)
    try:
        # the uplink is connected; the fault starts a few seconds later, so every alert falls in the outage
        sub.wait_for(lambda t, p: t.endswith("/status") and p["state"] == "online", 30)
        broker.stop()
        time.sleep(0.5)
    finally:
        sub.close()
    before = [sub.messages.get()[0] for _ in range(sub.messages.qsize())]
    assert not [t for t in before if not t.endswith("/status")], "an event went out before the outage"
    dropped_reason = "evicted" if policy == "drop_oldest" else "rejected"
    wait_until(
        lambda: counter(db_path, f"outbox_dropped.{dropped_reason}") >= 3, 60, "the outbox to overflow"
    )
    # Freeze the input so the outbox is final, then note exactly what waits in it.
    sim.terminate()
    sim.wait(10)
    time.sleep(2.0)
    waiting = outbox_rows(db_path)
    assert len(waiting) == MAX_ROWS
    dropped = counter(db_path, "outbox_dropped")
    assert dropped == counter(db_path, f"outbox_dropped.{dropped_reason}")
    with closing(sqlite3.connect(db_path)) as db:
        produced = {
            f"{a}:{n}"
            for a, m in db.execute("SELECT alert_id, json_extract(payload_json, '$.msg_id') FROM alerts")
            for n in range(int(m.rsplit(":", 1)[1]) + 1)
        }
    kept = {m for _, _, m in waiting}
    missing = produced - kept
    assert len(missing) == dropped, (
        sorted(missing),
        dropped,
    )  # every message waits or is counted
    # the policy chose: drop_oldest lost the oldest messages of an alert, reject_new the newest
    for alert_id in {m.rsplit(":", 1)[0] for m in missing}:
        lost = [int(m.rsplit(":", 1)[1]) for m in missing if m.startswith(alert_id)]
        held = [int(m.rsplit(":", 1)[1]) for m in kept if m.startswith(alert_id)]
        if held and policy == "drop_oldest":
            assert max(lost) < min(held), (alert_id, lost, held)
        if held and policy == "reject_new":
            assert min(lost) > max(held), (alert_id, lost, held)

    broker.start()
    sub = Subscriber(broker, "edgewatch/gw-test/#")  # subscribes before the agent's reconnect backoff ends
    try:
        wait_until(lambda: not outbox_rows(db_path), 30, "the outbox to drain")
        got: list[tuple[str, dict]] = []
        status: dict = {}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(got) < len(waiting):
            topic, payload = sub.wait_for(lambda t, p: True, 5)
            if topic.endswith("/alert"):
                got.append((topic, payload))
            elif topic.endswith("/status") and payload["state"] == "online":
                status = payload
        if not status:
            _, status = sub.wait_for(lambda t, p: t.endswith("/status") and p["state"] == "online", 10)
    finally:
        sub.close()
    # exactly what waited was delivered, in outbox order within each device
    for device in {d for _, d, _ in waiting}:
        expected = [m for _, d, m in waiting if d == device]
        delivered = [p["msg_id"] for t, p in got if p["device"] == device]
        assert delivered == expected, (device, delivered, expected)
    # the drops are counted where an operator looks
    assert status["outbox"]["dropped"] == dropped
    metrics = scrape(mport)
    assert metrics[f'edgewatch_outbox_dropped_total{{reason="{dropped_reason}"}}'] == dropped
    assert stop(agent) == 0
    assert "Traceback" not in (tmp_path / "agent.log").read_text()
