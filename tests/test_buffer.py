"""Buffer on a real SQLite file: batching, reads, index use, retention by age and size, write failures."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.buffer import Buffer, BufferConfig
from agent.db import open_db, upsert_rows
from agent.types import Judgement, Reading, Score

T0 = 1_764_806_400.0


def rd(ts: float, device: str = "pump-01", seq: int | None = None) -> Reading:
    return Reading(
        device, ts, {"temperature": 40.0 + ts % 7, "vibration": 2.5, "pressure": 3.0}, seq, ts + 0.01
    )


def count(path: Path, table: str) -> int:
    """Count through a separate connection: what is really committed to the file."""
    with sqlite3.connect(path) as c:
        return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def judgement(end_ts: float, device: str = "pump-01") -> Judgement:
    s = Score(device, end_ts - 63, end_ts, 0.5, {"temperature": 0.2, "vibration": 0.3}, "m-1")
    return Judgement(s, threshold=1.0, anomalous=False)


def test_batches_commit_in_one_transaction_each(fresh_db, db_path: Path) -> None:
    buf = Buffer(fresh_db, BufferConfig(batch_size=10))
    for i in range(9):
        buf.add(rd(T0 + i))
    assert count(db_path, "readings") == 0  # still queued
    buf.add(rd(T0 + 9))
    assert count(db_path, "readings") == 10
    buf.add(rd(T0 + 10))
    assert count(db_path, "readings") == 10
    assert buf.flush()
    assert count(db_path, "readings") == 11
    assert buf.pending == 0


def test_round_trip_and_queries(fresh_db) -> None:
    buf = Buffer(fresh_db, BufferConfig(batch_size=1000))
    for i in range(50):
        buf.add(rd(T0 + i, "pump-01", i))
        buf.add(rd(T0 + i + 0.5, "fan-02", i))
    last = buf.last_n("pump-01", 5)  # flushes what is queued first
    assert [r.ts for r in last] == [T0 + i for i in range(45, 50)]
    assert last[-1] == rd(T0 + 49, "pump-01", 49)
    between = buf.readings_between("fan-02", T0 + 10.5, T0 + 13.5)
    assert [r.ts for r in between] == [T0 + 10.5, T0 + 11.5, T0 + 12.5]
    assert buf.last_ts_by_device() == {"pump-01": T0 + 49, "fan-02": T0 + 49.5}
    assert buf.devices() == ["fan-02", "pump-01"]
    assert buf.last_n("nobody", 3) == []


def test_last_n_uses_the_device_ts_index(fresh_db) -> None:
    plan = fresh_db.execute(
        "EXPLAIN QUERY PLAN SELECT device, ts, seq, received, values_json FROM readings "
        "WHERE device = ? ORDER BY ts DESC LIMIT ?",
        ["pump-01", 128],
    ).fetchall()
    detail = " ".join(str(row[-1]) for row in plan)
    assert "USING INDEX idx_readings_device_ts" in detail
    assert "TEMP B-TREE" not in detail  # no sort: the index gives the order


def test_judgements_are_stored(fresh_db, db_path: Path) -> None:
    buf = Buffer(fresh_db, BufferConfig(batch_size=2))
    buf.add_judgements([judgement(T0), judgement(T0 + 8)])
    with sqlite3.connect(db_path) as c:
        rows = c.execute(
            "SELECT device, end_ts, error, threshold, anomalous, model_id FROM scores"
        ).fetchall()
    assert rows == [("pump-01", T0, 0.5, 1.0, 0, "m-1"), ("pump-01", T0 + 8, 0.5, 1.0, 0, "m-1")]


def _add_outbox_and_alert(db) -> None:
    db.execute(
        "INSERT INTO outbox (msg_id, device, topic, payload, created) VALUES ('m1', 'pump-01', 't', x'00', ?)",
        [T0 - 10 * 86400],
    )
    db.execute(
        "INSERT INTO alerts (alert_id, device, kind, state, opened_ts, updated_ts, payload_json) "
        "VALUES ('a1', 'pump-01', 'anomaly', 'open', ?, ?, '{}')",
        [T0 - 10 * 86400, T0 - 10 * 86400],
    )


def test_retention_by_age_keeps_outbox_and_alerts(fresh_db, db_path: Path) -> None:
    buf = Buffer(fresh_db, BufferConfig(retention_hours=24))
    _add_outbox_and_alert(fresh_db)
    for h in range(48):
        buf.add(rd(T0 - h * 3600))
    buf.add_judgements([judgement(T0 - 30 * 3600), judgement(T0 - 3600)])
    deleted = buf.apply_retention(now=T0)
    assert deleted == {"readings": 23, "scores": 1}  # hours 25..47 are older than 24 h
    assert min(r.ts for r in buf.readings_between("pump-01", 0, T0 + 1)) == T0 - 24 * 3600
    assert count(db_path, "outbox") == 1
    assert count(db_path, "alerts") == 1


def test_retention_by_size_deletes_oldest_until_under_cap(fresh_db, db_path: Path) -> None:
    buf = Buffer(fresh_db, BufferConfig(batch_size=1000, max_db_mb=0.5))
    _add_outbox_and_alert(fresh_db)
    n = 20_000
    for i in range(n):
        buf.add(rd(T0 + i))
    buf.flush()
    assert buf.used_bytes() > 0.5 * 2**20  # the test would be empty otherwise
    deleted = buf.apply_retention(now=T0 + n)
    assert buf.used_bytes() <= 0.5 * 2**20
    kept = count(db_path, "readings")
    assert kept + deleted["readings"] == n
    assert 0 < kept < n
    remaining = buf.readings_between("pump-01", 0, T0 + n)
    assert remaining[-1].ts == T0 + n - 1  # the newest survive
    assert remaining[0].ts == T0 + n - kept  # contiguous: only the oldest went
    assert count(db_path, "outbox") == 1
    assert count(db_path, "alerts") == 1


def test_failed_write_keeps_rows_for_the_next_flush(tmp_path: Path) -> None:
    path = tmp_path / "edgewatch.db"
    db = open_db(path)
    db.execute("PRAGMA busy_timeout=0")
    buf = Buffer(db, BufferConfig(batch_size=1000))
    for i in range(5):
        buf.add(rd(T0 + i))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    assert not buf.flush()
    assert buf.pending == 5
    other.execute("ROLLBACK")
    other.close()
    assert buf.flush()
    assert count(path, "readings") == 5
    db.conn.close()


def test_reopen_sees_flushed_data(tmp_path: Path) -> None:
    path = tmp_path / "edgewatch.db"
    db = open_db(path, synchronous="FULL")
    buf = Buffer(db, BufferConfig(synchronous="FULL"))
    buf.add(rd(T0, seq=1))
    buf.flush()
    db.conn.close()
    db2 = open_db(path)
    assert Buffer(db2).last_ts_by_device() == {"pump-01": T0}
    db2.conn.close()


def test_values_json_is_exactly_what_the_json_encoder_writes() -> None:
    import json
    import math
    import random

    import numpy as np

    from agent.buffer import values_json

    ref = json.JSONEncoder(separators=(",", ":")).encode
    cases: list[dict] = [
        {},
        {"temperature": 40.0, "vibration": 2.5, "pressure": 3.0},
        {"a": 1},
        {"a": True},
        {"a": None},
        {"a": math.nan},
        {"a": math.inf, "b": -math.inf},
        {"ü": 1.5, 'q"x\\': 2.0, "tab\t": 0.1},
        {1: 2.0},
        {"a": np.float64(0.1)},
        {"a": -0.0, "b": 1e-300, "c": 1e300, "d": 5e-324, "e": 1e16, "f": 123456789.123},
        {"infeed": 1.0, "nano": 2.0},
    ]
    rnd = random.Random(0)
    cases += [
        {"temperature": rnd.uniform(-50, 200), "vibration": rnd.random() * 10 ** rnd.randint(-30, 30)}
        for _ in range(5000)
    ]
    for c in cases:
        assert values_json(c) == ref(c), c
    with pytest.raises(TypeError):
        values_json({"a": np.float32(0.1)})  # as the encoder itself: not JSON serializable


def test_upsert_rows_leaves_what_sqlite_utils_upsert_leaves(tmp_path: Path) -> None:
    """The alert writer's cached INSERT ... ON CONFLICT must match sqlite-utils' upsert row for row:
    new keys inserted, existing keys updated, untouched keys kept."""
    first = [
        {"alert_id": "a", "device": "p1", "kind": "anomaly", "state": "open", "opened_ts": 1.0,
         "updated_ts": 1.0, "resolved_ts": None, "peak": 2.0, "payload_json": "{}"},
        {"alert_id": "b", "device": "p2", "kind": "anomaly", "state": "open", "opened_ts": 3.0,
         "updated_ts": 3.0, "resolved_ts": None, "peak": 5.0, "payload_json": "{}"},
    ]  # fmt: skip
    second = [
        {"alert_id": "a", "device": "p1", "kind": "anomaly", "state": "resolved", "opened_ts": 1.0,
         "updated_ts": 9.0, "resolved_ts": 9.0, "peak": 7.5, "payload_json": '{"n": 2}'},
        {"alert_id": "c", "device": "p3", "kind": "anomaly", "state": "open", "opened_ts": 4.0,
         "updated_ts": 4.0, "resolved_ts": None, "peak": 1.0, "payload_json": "{}"},
    ]  # fmt: skip
    tables = []
    for use_ours in (True, False):
        db = open_db(tmp_path / f"{use_ours}.db")
        for rows in (first, second):
            with db.atomic():
                if use_ours:
                    upsert_rows(db, "alerts", rows, pk="alert_id")
                else:
                    db["alerts"].upsert_all(rows, pk="alert_id")
        tables.append(db.execute("SELECT * FROM alerts ORDER BY alert_id").fetchall())
        db.conn.close()
    assert tables[0] == tables[1]
    assert [r[0] for r in tables[0]] == ["a", "b", "c"]
    assert tables[0][0][3] == "resolved" and tables[0][1][3] == "open"  # a updated, b kept
