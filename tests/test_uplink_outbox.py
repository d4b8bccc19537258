"""The durable outbox on a real SQLite file: order, idempotence, caps and drop policies, expiry, encoding."""

from __future__ import annotations

import io
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agent import metrics
from agent.types import Event
from agent.uplink import (
    Caps,
    ConsoleSink,
    Outbox,
    OutboxMessage,
    Uplink,
    UplinkConfig,
    encode_payload,
    topic_level,
)


def msg(i: int, device: str = "pump-01", size: int = 10) -> OutboxMessage:
    return OutboxMessage(f"m:{i}", f"edgewatch/gw/{device}/alert", b"x" * size, device=device)


def dropped_metric(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("edgewatch_outbox_dropped_total", {"reason": reason}) or 0.0


def counters_row(db_path: Path) -> int | None:
    with sqlite3.connect(db_path) as conn:
        row = conn.execute("SELECT value FROM counters WHERE name = 'outbox_dropped'").fetchone()
    return row[0] if row else None


def test_put_peek_ack_keeps_insertion_order(db_path: Path) -> None:
    ob = Outbox(db_path)
    for i in range(6):
        assert ob.put(msg(i, device=f"dev-{i % 2}"))
    assert ob.depth() == 6
    assert ob.size_bytes() == 60
    rows = ob.peek(10)
    assert [r.msg_id for r in rows] == [f"m:{i}" for i in range(6)]
    assert [r.msg_id for r in ob.peek(2, after_id=rows[3].id)] == ["m:4", "m:5"]
    assert ob.ack(rows[1].id)
    assert not ob.ack(rows[1].id)  # already gone
    assert ob.ack_many([rows[0].id, rows[2].id, 999_999]) == 2
    assert [r.msg_id for r in ob.peek(10)] == ["m:3", "m:4", "m:5"]
    assert ob.depth() == 3
    assert metrics.REGISTRY.get_sample_value("edgewatch_outbox_depth") == 3
    ob.close()


def test_same_msg_id_twice_is_a_noop(db_path: Path) -> None:
    ob = Outbox(db_path)
    assert ob.put(msg(1))
    assert ob.put(OutboxMessage("m:1", "other/topic", b"different", device="x"))
    assert ob.depth() == 1
    assert ob.peek(5)[0].payload == b"x" * 10
    assert ob.dropped() == 0


def test_rows_and_drop_count_survive_reopen(db_path: Path) -> None:
    ob = Outbox(db_path, Caps(max_rows=2))
    for i in range(5):
        ob.put(msg(i))
    ob.mark_sent([ob.peek(1)[0].id])
    ob.close()
    again = Outbox(db_path, Caps(max_rows=2))
    assert again.depth() == 2
    assert again.size_bytes() == 20
    assert again.dropped() == 3
    assert again.dropped_by_reason() == {"evicted": 3}
    rows = again.peek(5)
    assert [r.msg_id for r in rows] == ["m:3", "m:4"]
    assert [r.attempts for r in rows] == [1, 0]


def test_drop_oldest_evicts_and_counts(db_path: Path) -> None:
    before = dropped_metric("evicted")
    ob = Outbox(db_path, Caps(max_rows=5, drop_policy="drop_oldest"))
    results = [ob.put(msg(i)) for i in range(8)]
    assert results == [True] * 8
    assert [r.msg_id for r in ob.peek(10)] == ["m:3", "m:4", "m:5", "m:6", "m:7"]
    assert ob.dropped() == 3
    assert counters_row(db_path) == 3
    assert dropped_metric("evicted") - before == 3


def test_reject_new_refuses_and_counts(db_path: Path) -> None:
    before = dropped_metric("rejected")
    ob = Outbox(db_path, Caps(max_rows=5, drop_policy="reject_new"))
    results = [ob.put(msg(i)) for i in range(8)]
    assert results == [True] * 5 + [False] * 3
    assert [r.msg_id for r in ob.peek(10)] == [f"m:{i}" for i in range(5)]
    assert ob.dropped() == 3
    assert counters_row(db_path) == 3
    assert dropped_metric("rejected") - before == 3
    # Room again after an acknowledgement: the next message is accepted.
    ob.ack(ob.peek(1)[0].id)
    assert ob.put(msg(99))


def test_byte_cap_evicts_as_many_as_needed(db_path: Path) -> None:
    ob = Outbox(db_path, Caps(max_rows=1000, max_bytes=1000))
    for i in range(4):
        ob.put(msg(i, size=300))
    assert ob.depth() == 3  # 1200 bytes would not fit
    assert ob.put(msg(10, size=700))  # needs two more evictions
    assert [r.msg_id for r in ob.peek(10)] == ["m:3", "m:10"]
    assert ob.size_bytes() == 1000
    assert ob.dropped() == 3


def test_message_larger_than_the_cap_is_dropped_alone(db_path: Path) -> None:
    before = dropped_metric("too_large")
    ob = Outbox(db_path, Caps(max_bytes=1024))
    ob.put(msg(1))
    assert not ob.put(msg(2, size=2000))
    assert [r.msg_id for r in ob.peek(5)] == ["m:1"]  # nothing else was evicted for it
    assert dropped_metric("too_large") - before == 1
    assert ob.dropped() == 1


def test_expire_drops_by_age(db_path: Path) -> None:
    ob = Outbox(db_path, Caps(max_age_s=100.0))
    ob.put(msg(1), now=1000.0)
    ob.put(msg(2), now=1050.0)
    ob.put(msg(3), now=1200.0)
    assert ob.expire(now=1160.0) == 2
    assert [r.msg_id for r in ob.peek(5)] == ["m:3"]
    assert ob.dropped() == 2
    assert ob.dropped_by_reason() == {"expired": 2}
    assert ob.size_bytes() == 10
    assert ob.expire(now=1160.0) == 0


def test_bad_drop_policy_is_refused(db_path: Path) -> None:
    with pytest.raises(ValueError, match="drop_policy"):
        Outbox(db_path, Caps(drop_policy="drop_newest"))
    with pytest.raises(ValidationError):
        UplinkConfig(drop_policy="drop_newest")
    with pytest.raises(ValidationError):
        UplinkConfig(max_rows=10, unknown_field=1)
    with pytest.raises(ValidationError):
        UplinkConfig(topic_prefix="a/#")


def test_encoding_is_compact_and_has_no_nan() -> None:
    payload = {
        "msg_id": "a:0",
        "score": float("nan"),
        "peak": np.float32(1.5),
        "n": np.int64(3),
        "inf": float("-inf"),
        "nested": [{"share": np.float64("nan")}, (1, 2)],
        "arr": np.array([1.0, np.nan]),
    }
    raw = encode_payload(payload)
    assert b" " not in raw
    assert b"NaN" not in raw and b"Infinity" not in raw
    assert json.loads(raw) == {
        "msg_id": "a:0",
        "score": None,
        "peak": 1.5,
        "n": 3,
        "inf": None,
        "nested": [{"share": None}, [1, 2]],
        "arr": [1.0, None],
    }
    with pytest.raises(TypeError):
        encode_payload({"msg_id": "x", "bad": object()})


def test_topic_levels_are_sanitised() -> None:
    assert topic_level("pump-01") == "pump-01"
    assert topic_level("/dev/ttyUSB0") == "_dev_ttyUSB0"
    assert topic_level("a+b#c") == "a_b_c"
    assert topic_level("") == "_"


def test_enqueue_maps_topics_and_refuses_unsendable_events(db_path: Path) -> None:
    ob = Outbox(db_path)
    up = Uplink(UplinkConfig(topic_prefix="plant"), ob, "gw-01")
    assert up.enqueue(Event("alert", "pump-01", {"msg_id": "a:0", "score": math.nan}))
    assert up.enqueue(Event("health", "/dev/ttyS0", {"msg_id": "h:0"}))
    rows = ob.peek(5)
    assert [r.topic for r in rows] == ["plant/gw-01/pump-01/alert", "plant/gw-01/_dev_ttyS0/health"]
    assert rows[0].device == "pump-01" and rows[1].device == "/dev/ttyS0"
    assert json.loads(rows[0].payload) == {"msg_id": "a:0", "score": None}
    assert up.topic_for(Event("status", None)) == "plant/gw-01/status"
    with pytest.raises(ValueError, match="msg_id"):
        up.enqueue(Event("alert", "pump-01", {"state": "open"}))
    with pytest.raises(ValueError, match="needs a device"):
        up.enqueue(Event("health", None, {"msg_id": "h:1"}))
    with pytest.raises(ValueError, match="topic_kind"):
        up.enqueue(Event("bogus", "pump-01", {"msg_id": "b:1"}))
    assert ob.depth() == 2  # the refused events left nothing behind


def test_backoff_doubles_within_jitter_and_caps() -> None:
    cfg = UplinkConfig(mqtt={"reconnect_min_s": 1.0, "reconnect_max_s": 8.0}, reconnect_jitter=0.25)
    up = Uplink.__new__(Uplink)
    up.config = cfg
    for streak, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0), (100, 8.0)]:
        delays = [up._backoff(streak) for _ in range(50)]
        assert all(base * 0.75 <= d <= base * 1.25 for d in delays), (streak, delays)
        assert len(set(delays)) > 1  # jitter spreads a fleet out


def test_console_sink_prints_one_compact_json_line_per_event() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out)
    sink(Event("alert", "pump-01", {"msg_id": "a:0", "type": "alert", "score": float("nan")}))
    sink(Event("health", "pump-02", {"msg_id": "h:0", "type": "health", "detail": "stuck at 4.2"}))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {"msg_id": "a:0", "type": "alert", "score": None}
    assert json.loads(lines[1])["detail"] == "stuck at 4.2"
    assert ", " not in lines[1] and ": " not in lines[0]


def test_disk_full_loses_nothing_already_stored_and_enqueue_reports_it(db_path: Path) -> None:
    ob = Outbox(db_path)
    up = Uplink(UplinkConfig(), ob, "gw-01")
    for i in range(3):
        assert up.enqueue(Event("alert", "pump-01", {"msg_id": f"a:{i}", "pad": "x" * 100}))
    # Cap the file at its current size: the next insert that needs a new page fails with SQLITE_FULL.
    pages = ob._conn.execute("PRAGMA page_count").fetchone()[0]
    ob._conn.execute(f"PRAGMA max_page_count = {pages}")
    errors_before = metrics.REGISTRY.get_sample_value("edgewatch_db_errors_total", {"kind": "outbox"}) or 0.0
    big = {"msg_id": "a:big", "pad": "y" * 200_000}
    assert up.enqueue(Event("alert", "pump-01", big)) is False
    assert (
        metrics.REGISTRY.get_sample_value("edgewatch_db_errors_total", {"kind": "outbox"})
        == errors_before + 1
    )
    assert ob.depth() == 3 and [r.msg_id for r in ob.peek(10)] == ["a:0", "a:1", "a:2"]
    assert ob._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # the refused message is held in memory, and what follows waits behind it (order per device)
    assert len(up.held) == 1
    assert up.enqueue(Event("alert", "pump-01", {"msg_id": "a:3"})) is False
    assert len(up.held) == 2 and up.retry_held() == 2 and ob.depth() == 3
    ob._conn.execute("PRAGMA max_page_count = 1073741823")
    assert up.retry_held() == 0  # the agent's flush job calls this: space is back, both are written
    assert [r.msg_id for r in ob.peek(10)] == ["a:0", "a:1", "a:2", "a:big", "a:3"]
    assert up.enqueue(Event("alert", "pump-01", big))  # a re-send of the same id is a no-op
    assert ob.depth() == 5 and ob.size_bytes() == sum(len(r.payload) for r in ob.peek(10))


def test_disk_full_past_the_memory_bound_drops_the_oldest_held_and_counts_them(db_path: Path) -> None:
    from agent.uplink import MAX_HELD

    ob = Outbox(db_path)
    up = Uplink(UplinkConfig(), ob, "gw-01")
    assert up.enqueue(Event("alert", "pump-01", {"msg_id": "a:0", "pad": "x" * 100}))
    pages = ob._conn.execute("PRAGMA page_count").fetchone()[0]
    ob._conn.execute(f"PRAGMA max_page_count = {pages}")
    before = metrics.REGISTRY.get_sample_value("edgewatch_outbox_dropped_total", {"reason": "disk_full"}) or 0
    n = MAX_HELD + 5
    for i in range(1, n + 1):
        up.enqueue(Event("alert", "pump-01", {"msg_id": f"b:{i}", "pad": "y" * 5000}))
    assert len(up.held) == MAX_HELD
    after = metrics.REGISTRY.get_sample_value("edgewatch_outbox_dropped_total", {"reason": "disk_full"})
    assert after == before + 5
    assert up.status_payload("online")["outbox"]["dropped"] == 5  # counted before it can be persisted
    ob._conn.execute("PRAGMA max_page_count = 1073741823")
    assert up.retry_held() == 0
    ids = [r.msg_id for r in ob.peek(n + 10)]
    assert ids == ["a:0"] + [f"b:{i}" for i in range(6, n + 1)], "the oldest held ones were dropped"
    assert ob.dropped_by_reason() == {"disk_full": 5} and ob.dropped() == 5
