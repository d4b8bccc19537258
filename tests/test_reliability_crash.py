"""kill -9 harness: the agent, fed by the simulator with a fault (so alerts happen), is SIGKILLed at random
moments and restarted on the same state. After every kill the database must be intact and hold
everything it had committed; at the end every alert the agent opened must have reached the broker
(matched by id), a message seen twice must be the same message, and threshold baselines must have
carried on from where they were. `make soak` runs the same harness with >= 50 kills (soak_crash.py).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agent_proc import MODEL, Subscriber, start_agent, start_sim_pty, stop, write_config
from conftest import Broker

from agent.config import load_config
from agent.service import Agent

# Fast persistence and quick, chatty alerts so a few seconds of uptime between kills exercise every
# table and path (this harness tests delivery, not detection quality).
EXTRA_CONFIG = """
[scheduler]
flush_interval_s = 1

[threshold]
persist_every_s = 1

# every window scored, so the baseline learns between two kills (the screen would learn every 8th)
[screen]
enabled = false

[alerts]
persist_every_s = 1
open_k = 3
open_n = 5
update_every = 2
"""


@dataclass
class Snapshot:
    """What a reader sees committed in the database at one moment."""

    max_rowid: int
    readings: tuple[int, float]  # count and sum of ts over rowid <= max_rowid
    alerts: dict[str, int]  # alert_id -> n of the last message the row records
    thresholds: dict[str, tuple[str, list[float]]] = field(default_factory=dict)  # device -> model, ring


def snapshot(db_path: Path) -> Snapshot:
    if not db_path.exists():
        return Snapshot(0, (0, 0.0), {})
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "state" not in tables:  # killed before the first migration committed
            return Snapshot(0, (0, 0.0), {})
        max_rowid = db.execute("SELECT coalesce(max(rowid), 0) FROM readings").fetchone()[0]
        count, total = db.execute(
            "SELECT count(*), coalesce(sum(ts), 0) FROM readings WHERE rowid <= ?", [max_rowid]
        ).fetchone()
        alerts = {
            a: int(json.loads(p)["msg_id"].rsplit(":", 1)[1])
            for a, p in db.execute("SELECT alert_id, payload_json FROM alerts")
        }
        thresholds = {
            k.split(":", 1)[1]: (json.loads(v)["model_id"], json.loads(v)["scores"])
            for k, v in db.execute("SELECT key, value_json FROM state WHERE key LIKE 'threshold:%'")
        }
    return Snapshot(max_rowid, (count, total), alerts, thresholds)


def integrity(db_path: Path) -> str:
    with closing(
        sqlite3.connect(db_path, timeout=10)
    ) as db:  # read-write: recovers the WAL as a restart would
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def outbox_depth(db_path: Path) -> int:
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as db:
        return db.execute("SELECT count(*) FROM outbox").fetchone()[0]


def resumed(before: tuple[str, list[float]], after: tuple[str, list[float]]) -> bool:
    """True if `after` continues `before`: some suffix of the older ring starts the newer one (the ring
    may have rolled over) or the newer ring is the older one plus new scores. A baseline learnt on
    another model is not restored, by design."""
    (model_before, old), (model_after, new) = before, after
    if not old or model_before != model_after:
        return True
    return any(new[:m] == old[-m:] for m in range(len(old), 0, -1))


def wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)


def run_kill_harness(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen], kills: int, seed: int = 7
) -> dict[str, int]:
    """Kill and restart the agent `kills` times; assert the guarantees; return counts for the report."""
    rnd = random.Random(seed)
    sub = Subscriber(broker, "edgewatch/gw-test/+/alert")
    sim, pty = start_sim_pty(
        "--seed", str(seed), "--devices", "2", "--speed", "100", "--scenario", "bearing_wear",
        "--fault-after", "120", "--degradation", "600",
    )  # fmt: skip
    procs.append(sim)
    source = f'[[sources]]\ntype = "serial"\nname = "bus"\nport = "{pty}"\n{EXTRA_CONFIG}'
    cfg = write_config(tmp_path / "ew.toml", tmp_path / "state", broker, source)
    model = shutil.copytree(MODEL, tmp_path / "model")  # the shipped model may be regenerated meanwhile
    cfg.write_text(cfg.read_text().replace(str(MODEL), str(model)))
    db_path = tmp_path / "state" / "edgewatch.db"
    resumes = 0
    prev_thresholds: dict[str, list[float]] = {}
    try:
        for i in range(kills):
            agent = start_agent(cfg, tmp_path / f"run{i}.log")
            procs.append(agent)
            log = tmp_path / f"run{i}.log"
            if i % 5 == 4:  # now and then during start-up (database open, migration, model load)
                time.sleep(rnd.uniform(0.1, 1.5))
            else:  # otherwise at a random moment of normal operation
                wait_for_log(log, "running", agent)
                time.sleep(rnd.uniform(0.3, 3.5))
            before = snapshot(db_path)
            agent.send_signal(signal.SIGKILL)
            assert agent.wait(10) == -signal.SIGKILL
            if not db_path.exists():  # killed before it created its database: nothing to check yet
                continue
            assert integrity(db_path) == "ok", f"kill {i}"
            after = snapshot(db_path)
            # every reading committed before the kill is still there, unchanged
            assert after.max_rowid >= before.max_rowid
            with closing(sqlite3.connect(db_path)) as db:
                kept = db.execute(
                    "SELECT count(*), coalesce(sum(ts), 0) FROM readings WHERE rowid <= ?", [before.max_rowid]
                ).fetchone()
            assert kept == before.readings, f"kill {i}: committed readings changed"
            # every committed alert is still there, and never went back to an earlier message
            for alert_id, n in before.alerts.items():
                assert after.alerts.get(alert_id, -1) >= n, f"kill {i}: alert {alert_id} lost or rewound"
            # the baseline this run restored from is continued, not restarted
            for device, base in after.thresholds.items():
                if device in prev_thresholds:
                    assert resumed(prev_thresholds[device], base), f"kill {i}: {device} baseline reset"
                    resumes += base != prev_thresholds[device]
            prev_thresholds = after.thresholds
        # a last clean run: until an alert exists (on a slow machine the kills may come before one),
        # then without input until the outbox is drained
        agent = start_agent(cfg, tmp_path / "final.log")
        procs.append(agent)
        wait_for_log(tmp_path / "final.log", "running", agent)
        deadline = time.monotonic() + 90
        while not snapshot(db_path).alerts and time.monotonic() < deadline:
            time.sleep(0.5)
        sim.terminate()
        sim.wait(10)
        deadline = time.monotonic() + 60
        while outbox_depth(db_path) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)
        assert stop(agent) == 0, (tmp_path / "final.log").read_text()[-2000:]
        assert outbox_depth(db_path) == 0
    finally:
        sub.close()
    seen: dict[str, list[dict]] = {}
    while not sub.messages.empty():
        _, payload = sub.messages.get()
        seen.setdefault(payload["msg_id"], []).append(payload)
    final = snapshot(db_path)
    assert final.alerts, "no alert was opened: the harness did not exercise alert delivery"
    for device, base in final.thresholds.items():  # the clean run continued the last kill's baselines
        if device in prev_thresholds:
            assert resumed(prev_thresholds[device], base), f"final run: {device} baseline reset"
            resumes += base != prev_thresholds[device]
    for alert_id, n in final.alerts.items():
        assert f"{alert_id}:0" in seen, f"open of alert {alert_id} never reached the broker"
        assert f"{alert_id}:{n}" in seen, f"last message of alert {alert_id} never reached the broker"
    duplicates = 0
    for msg_id, copies in seen.items():
        assert all(c == copies[0] for c in copies), f"{msg_id} carried different contents"
        assert msg_id.rsplit(":", 1)[0] == copies[0]["alert_id"]
        duplicates += len(copies) - 1
    for log in tmp_path.glob("run*.log"):
        assert "database disk image is malformed" not in log.read_text()
    assert resumes > 0, "no baseline was ever carried across a kill"
    return {
        "kills": kills,
        "alerts": len(final.alerts),
        "messages": len(seen),
        "duplicates": duplicates,
        "readings": final.readings[0],
        "baseline_resumes": resumes,
    }


@pytest.mark.timeout(150)
def test_sigkill_at_random_moments_loses_nothing_committed(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    result = run_kill_harness(broker, tmp_path, procs, kills=6)
    print(result)
    assert result["readings"] > 0


# --- the two service fixes this harness motivated ---------------------------------------------------


def _service_config(tmp_path: Path, synchronous: str) -> Path:
    cfg = tmp_path / "svc.toml"
    cfg.write_text(
        f"""
[gateway]
id = "gw-svc"
state_dir = "{tmp_path / "state"}"

[[sources]]
type = "serial"
name = "unused"
port = "/dev/null"

[model]
path = "{MODEL}"

[buffer]
synchronous = "{synchronous}"

[uplink]
shutdown_flush_s = 0

[uplink.mqtt]
host = "127.0.0.1"
port = 9

[metrics]
enabled = false
"""
    )
    return cfg


@pytest.mark.parametrize(("mode", "code"), [("NORMAL", 1), ("FULL", 2)])
def test_buffer_synchronous_applies_to_the_outbox_connection_too(
    tmp_path: Path, mode: str, code: int
) -> None:
    agent = Agent(load_config(_service_config(tmp_path, mode)), sources=[])
    try:
        assert agent.db.execute("PRAGMA synchronous").fetchone()[0] == code
        assert agent.outbox._conn.execute("PRAGMA synchronous").fetchone()[0] == code
    finally:
        agent.shutdown()


def test_alert_committed_but_never_queued_is_sent_after_a_restart(tmp_path: Path) -> None:
    """The crash window between the alert state commit and the outbox put: at start the agent queues
    each device's last alert message again (once: a message still in the outbox is not doubled)."""
    cfg = load_config(_service_config(tmp_path, "NORMAL"))
    agent = Agent(cfg, sources=[])
    payload = {"v": 1, "type": "alert", "msg_id": "abc:2", "alert_id": "abc", "state": "update"}
    older = dict(payload, msg_id="abc:1")
    for p, ts in ((older, 1.0), (payload, 2.0)):
        agent.db["alerts"].upsert(
            {"alert_id": p["msg_id"], "device": "pump-01", "kind": "anomaly", "state": "open", "opened_ts": 0.0,
             "updated_ts": ts, "resolved_ts": None, "peak": 1.0, "payload_json": json.dumps(p)},
            pk="alert_id",
        )  # fmt: skip
    agent.shutdown()
    for _ in range(2):
        agent = Agent(cfg, sources=[])
        rows = agent.outbox.peek(10)
        agent.shutdown()
        assert [(r.msg_id, r.topic, json.loads(r.payload)) for r in rows] == [
            ("abc:2", "edgewatch/gw-svc/pump-01/alert", payload)
        ]
