"""Disk full: SQLite answers SQLITE_FULL (simulated with a `max_page_count` on the agent's connections, so
the file cannot grow). The agent, driven through its own main-loop handler, logs it, applies retention
at once so its caps free pages, keeps scoring and alerting, holds the rows it could not write in memory
up to a bound (dropping and counting the oldest beyond it), and writes them when space returns.
(The outbox's own disk-full behaviour is tested in tests/test_uplink_outbox.py.)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_proc import EDGEWATCH, MODEL

from agent import metrics
from agent.buffer import MAX_PENDING_BATCHES, Buffer, BufferConfig
from agent.config import load_config
from agent.db import open_db
from agent.recording import read_recording
from agent.service import Agent
from agent.types import RawMessage, Reading

UNLIMITED = 1073741823


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two pumps for 50 minutes, pump-01 wearing a bearing from minute 10."""
    out = tmp_path_factory.mktemp("rec") / "rec.csv"
    subprocess.run(
        [EDGEWATCH, "sim", "record", "--out", str(out), "--seed", "7", "--devices", "2",
         "--scenario", "bearing_wear", "--fault-after", "600", "--degradation", "1200", "--duration", "3000"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def messages(path: Path) -> list[RawMessage]:
    """The recording as MQTT telemetry in time order, each received 0.2 s after its timestamp."""
    rows = []
    for rec in read_recording(path):
        for i, (ts, vals) in enumerate(zip(rec.ts, rec.values, strict=True)):
            values = {
                c: (None if math.isnan(v) else float(v)) for c, v in zip(rec.channels, vals, strict=True)
            }
            doc = {"v": 1, "device": rec.device, "seq": i, "ts": round(ts * 1000), "values": values}
            rows.append(
                (
                    float(ts),
                    RawMessage(json.dumps(doc).encode(), "mqtt", f"s/{rec.device}/telemetry", ts + 0.2),
                )
            )
    rows.sort(key=lambda r: r[0])
    return [m for _, m in rows]


def make_agent(tmp_path: Path, max_db_mb: float) -> Agent:
    model = shutil.copytree(MODEL, tmp_path / "model")  # the shipped model may be regenerated meanwhile
    cfg = tmp_path / "ew.toml"
    cfg.write_text(
        f"""
[gateway]
id = "gw-full"
state_dir = "{tmp_path / "state"}"

[[sources]]
type = "serial"
name = "unused"
port = "/dev/null"

[model]
path = "{model}"

[buffer]
batch_size = 50
max_db_mb = {max_db_mb}

[alerts]
open_k = 3
open_n = 5

[uplink]
shutdown_flush_s = 0

[uplink.mqtt]
host = "127.0.0.1"
port = 9

[metrics]
enabled = false
"""
    )
    return Agent(load_config(cfg), sources=[])


def fill_disk(agent: Agent) -> None:
    """No page can be added to the file from now on, for the pipeline and the outbox alike."""
    for conn in (agent.db.conn, agent.outbox._conn):
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")


def free_disk(agent: Agent) -> None:
    for conn in (agent.db.conn, agent.outbox._conn):
        conn.execute(f"PRAGMA max_page_count = {UNLIMITED}")


def count(agent: Agent, table: str) -> int:
    return agent.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def feed(agent: Agent, msgs: Iterator[RawMessage] | list[RawMessage]) -> None:
    for m in msgs:
        agent._handle(m)  # the service's own handler: an exception would be logged, not raised


def db_errors() -> float:
    return sum(s.value for m in metrics.DB_ERRORS.collect() for s in m.samples if s.name.endswith("_total"))


def test_disk_full_applies_retention_and_keeps_scoring_and_alerting(
    tmp_path: Path, recording: Path, caplog: pytest.LogCaptureFixture
) -> None:
    msgs = messages(recording)
    agent = make_agent(tmp_path, max_db_mb=0.25)
    try:
        n0 = len(msgs) // 3
        feed(agent, msgs[:n0])  # the file grows past the cap: no retention job has run yet
        agent.pipeline.buffer.flush()
        stored_before = count(agent, "readings")
        oldest_before = agent.db.execute("SELECT min(ts) FROM readings").fetchone()[0]
        assert agent.pipeline.buffer.used_bytes() > 0.25 * 2**20
        windows0, errors0 = agent.pipeline.stats.windows, db_errors()
        fill_disk(agent)
        with caplog.at_level(logging.INFO):
            feed(agent, msgs[n0:])
            agent.pipeline.buffer.flush()
        assert "buffer write failed" in caplog.text and "database or disk is full" in caplog.text
        assert db_errors() > errors0
        # retention ran at once and freed the space the new readings needed: the oldest went
        assert "retention deleted" in caplog.text
        assert agent.pipeline.buffer.pending == 0
        assert agent.db.execute("SELECT min(ts) FROM readings").fetchone()[0] > oldest_before
        newest = agent.db.execute("SELECT max(ts) FROM readings").fetchone()[0]
        assert newest == max(json.loads(m.payload)["ts"] for m in msgs) / 1000
        # scoring and alerting went on, and the alert reached the outbox
        assert agent.pipeline.stats.windows > windows0
        assert count(agent, "alerts") >= 1
        assert agent.outbox.depth() >= 1
        assert stored_before > 0
        assert agent.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        agent.shutdown()


def test_disk_full_under_the_cap_holds_rows_bounded_and_recovers(
    tmp_path: Path, recording: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention cannot help when the database is under its cap: the rows wait in memory (at most
    MAX_PENDING_BATCHES batches, the oldest dropped beyond) and are written once space returns."""
    msgs = messages(recording)
    agent = make_agent(tmp_path, max_db_mb=512)
    try:
        n0 = len(msgs) // 4
        feed(agent, msgs[:n0])
        agent.pipeline.buffer.flush()
        stored = count(agent, "readings")
        fill_disk(agent)
        n1 = n0 + 1000
        with caplog.at_level(logging.INFO):
            feed(agent, msgs[n0:n1])
        assert "buffer write failed" in caplog.text
        held = agent.pipeline.buffer.pending
        assert 0 < held <= 2 * MAX_PENDING_BATCHES * agent.config.buffer.batch_size
        assert count(agent, "readings") == stored  # nothing lost that was written
        windows = agent.pipeline.stats.windows
        free_disk(agent)
        agent._flush()  # the scheduler's flush job: held readings and held messages are written
        assert agent.uplink is not None and len(agent.uplink.held) == 0
        feed(agent, msgs[n1:])
        assert agent.pipeline.buffer.flush()
        assert agent.pipeline.stats.windows > windows
        # every accepted reading is stored: none was dropped, since the bound was not reached
        assert count(agent, "readings") == agent.pipeline.stats.accepted
    finally:
        agent.shutdown()


def test_disk_full_beyond_the_memory_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    db = open_db(tmp_path / "ew.db")
    buffer = Buffer(db, BufferConfig(batch_size=2))
    limit = MAX_PENDING_BATCHES * 2
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    dropped0 = metrics.BUFFER_DROPPED._value.get()
    readings = [
        Reading("pump-01", 1764806400.0 + i, {"vibration": 2.0 + i / 1000}, i, 0.0) for i in range(500)
    ]
    for r in readings:
        buffer.add(r)
    assert not buffer.flush()
    written = db.execute("SELECT count(*) FROM readings").fetchone()[0]  # the file's last free space
    assert buffer.pending == limit  # the newest `limit` rows wait
    assert metrics.BUFFER_DROPPED._value.get() - dropped0 == len(readings) - limit - written > 0
    db.execute(f"PRAGMA max_page_count = {UNLIMITED}")
    assert buffer.flush()
    ts = [row[0] for row in db.execute("SELECT ts FROM readings ORDER BY ts")]
    assert ts == [r.ts for r in readings[:written] + readings[-limit:]]
    db.conn.close()
