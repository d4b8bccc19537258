"""Reference encoder: lines and JSON exactly per docs/protocol.md, and garbage that never passes."""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_sim.stream import group_payloads
from firmware_sim.wire import encode_json, encode_line, garbage_line, garbage_payload, garbage_rng

LINE = re.compile(rb"^EW1,([A-Za-z0-9_.-]{1,32}),(\d+),(\d+),([^,*]+),([^,*]+),([^,*]+)\*([0-9A-F]{8})\n$")


def crc_ok(line: bytes) -> bool:
    body, _, crc = line.rstrip(b"\n").rpartition(b"*")
    return len(crc) == 8 and zlib.crc32(body) == int(crc, 16)


def test_line_layout_and_crc() -> None:
    line = encode_line("pump-01", 42, 1764806400000, 41.27, 2.315, 3.204)
    body = b"EW1,pump-01,42,1764806400000,41.27,2.315,3.204"
    assert line == body + b"*%08X\n" % zlib.crc32(body)
    assert LINE.match(line) and crc_ok(line)


def test_nan_seq_wrap_and_rounding() -> None:
    line = encode_line("p", 2**32 + 5, 0, float("nan"), 1.23456, -0.0001)
    fields = line.split(b"*")[0].split(b",")
    assert fields[2] == b"5"
    assert fields[4:] == [b"nan", b"1.235", b"0.000"]  # nan never becomes 0; no "-0.000"
    assert crc_ok(line)


@given(
    device=st.from_regex(r"[A-Za-z0-9_.-]{1,32}", fullmatch=True),
    seq=st.integers(0, 2**32 - 1),
    ts=st.integers(0, 4_102_444_800_000),
    vals=st.lists(st.floats(-1e4, 1e4) | st.just(float("nan")), min_size=3, max_size=3),
)
def test_any_reading_encodes_to_a_valid_short_line(device: str, seq: int, ts: int, vals: list[float]) -> None:
    line = encode_line(device, seq, ts, *vals)
    assert LINE.match(line), line
    assert crc_ok(line)
    assert len(line) <= 256


def test_every_single_byte_flip_breaks_the_crc() -> None:
    line = encode_line("pump-02", 7, 1764806400000, 40.0, 1.5, 3.9)
    star = line.rindex(b"*")
    for i in range(star):
        for bit in (0x01, 0x10, 0x40):
            bad = bytearray(line)
            bad[i] ^= bit
            assert not crc_ok(bytes(bad)), (i, bit)


def test_json_payload() -> None:
    raw = encode_json("pump-01", 42, 1764806400000, 41.27, float("nan"), 3.2041)
    msg = json.loads(raw.decode("utf-8"))
    assert msg == {
        "v": 1,
        "device": "pump-01",
        "seq": 42,
        "ts": 1764806400000,
        "values": {"temperature": 41.27, "vibration": None, "pressure": 3.204},
    }
    assert len(raw) <= 4096


@pytest.mark.parametrize("seq", range(200))
def test_garbage_line_never_passes(seq: int) -> None:
    valid = encode_line("pump-01", seq, 1764806400000 + seq, 40.0 + seq / 100, 1.5, 3.9)
    bad = garbage_line(garbage_rng(1, 0, seq), valid)
    assert bad.endswith(b"\n") and bad.count(b"\n") == 1 and b"\r" not in bad
    try:
        bad.decode("ascii")
    except UnicodeDecodeError:
        return  # rejected as `encoding`
    assert not crc_ok(bad) or not LINE.match(bad)


def test_garbage_is_deterministic_per_reading() -> None:
    valid = encode_line("pump-01", 3, 0, 1.0, 1.0, 1.0)
    assert garbage_line(garbage_rng(1, 0, 3), valid) == garbage_line(garbage_rng(1, 0, 3), valid)
    outs = {garbage_line(garbage_rng(1, 0, s), valid) for s in range(20)}
    assert len(outs) > 15


def test_garbage_payload_is_not_a_reading() -> None:
    valid = encode_json("pump-01", 1, 0, 1.0, 1.0, 1.0)
    for s in range(100):
        bad = garbage_payload(garbage_rng(2, 0, s), valid)
        with pytest.raises((UnicodeDecodeError, json.JSONDecodeError)):
            json.loads(bad.decode("utf-8"))
    assert np.all([b"\n" not in garbage_payload(garbage_rng(2, 0, s), valid) for s in range(20)])


# --- batch payloads: the simulator's grouping -------------------------------------------------------


def _rows(device: str, seqs: range) -> list[tuple[str, tuple[int, int, float, float, float]]]:
    return [(device, (s, 1764806400000 + 1000 * s, 40.0 + s, 2.0, float("nan"))) for s in seqs]


def test_batch_one_is_the_classic_stream() -> None:
    """--batch 1 (the default) sends exactly the single-form payloads, in tick order."""
    tick = [
        x for pair in zip(_rows("pump-01", range(3)), _rows("pump-02", range(3)), strict=True) for x in pair
    ]
    assert group_payloads(tick, 1) == [(d, encode_json(d, *row)) for d, row in tick]


def test_batches_hold_consecutive_readings_of_one_device_and_flush_at_the_tick_end() -> None:
    tick = [
        x for pair in zip(_rows("pump-01", range(7)), _rows("pump-02", range(7)), strict=True) for x in pair
    ]
    out = group_payloads(tick, 3)
    docs = [(d, json.loads(p)) for d, p in out]
    assert all(set(doc) == {"v", "device", "batch"} and doc["device"] == d for d, doc in docs)
    per_device = {
        dev: [[el["seq"] for el in doc["batch"]] for d, doc in docs if d == dev]
        for dev in ("pump-01", "pump-02")
    }
    # 7 readings in batches of 3: the last one is not held back for the next tick
    assert per_device == {"pump-01": [[0, 1, 2], [3, 4, 5], [6]], "pump-02": [[0, 1, 2], [3, 4, 5], [6]]}
    assert docs[0][1]["batch"][0]["values"]["pressure"] is None  # NaN -> null, never 0


def test_garbage_travels_alone_and_keeps_each_devices_order() -> None:
    junk = b"\xff\xfe not json"
    tick = [*_rows("pump-01", range(2)), ("pump-01", junk), *_rows("pump-01", range(2, 4))]
    out = group_payloads(tick, 10)
    assert [p if p == junk else [el["seq"] for el in json.loads(p)["batch"]] for _, p in out] == [
        [0, 1],
        junk,
        [2, 3],
    ]
