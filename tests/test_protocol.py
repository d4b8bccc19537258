"""docs/protocol.md pinned: the reference encoder (firmware_sim.wire) and decoder (agent.parse) agree."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.parse import MAX_BATCH, MAX_JSON_BYTES, MAX_PAYLOAD_BYTES, parse_json, parse_json_many, parse_line
from agent.types import Reading, Reject
from agent.validate import Validator
from firmware_sim import wire
from firmware_sim.wire import (
    DECIMALS,
    encode_json,
    encode_json_batch,
    encode_line,
    garbage_line,
    garbage_payload,
    garbage_rng,
)

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
CH = ("temperature", "vibration", "pressure")

devices = st.from_regex(r"[A-Za-z0-9_.-]{1,32}", fullmatch=True)
values = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(math.nan))


def expected_value(x: float, channel: str) -> float:
    """What survives the wire: the sensor's resolution (fixed decimals), NaN stays NaN."""
    return math.nan if math.isnan(x) else round(x, DECIMALS[channel]) + 0.0


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@settings(max_examples=150, deadline=None)
@given(devices, st.integers(0, 2**32 - 1), st.integers(0, 2**50), values, values, values)
def test_serial_round_trip(device: str, seq: int, ts_ms: int, t: float, v: float, p: float) -> None:
    line = encode_line(device, seq, ts_ms, t, v, p)
    assert len(line) <= 256
    r = parse_line(line, "/dev/ttyUSB0", 1.0)
    assert isinstance(r, Reading), r
    assert (r.device, r.seq, r.ts) == (device, seq, ts_ms / 1000)
    for ch, x in zip(CH, (t, v, p), strict=True):
        assert same(r.values[ch], expected_value(x, ch)), (ch, x, r.values[ch])


@settings(max_examples=150, deadline=None)
@given(devices, st.integers(0, 2**32 - 1), st.integers(0, 2**50), values, values, values)
def test_json_round_trip(device: str, seq: int, ts_ms: int, t: float, v: float, p: float) -> None:
    payload = encode_json(device, seq, ts_ms, t, v, p)
    r = parse_json(payload, f"edgewatch/sensors/{device}/telemetry", 1.0)
    assert isinstance(r, Reading), r
    assert (r.device, r.seq, r.ts) == (device, seq, ts_ms / 1000)
    for ch, x in zip(CH, (t, v, p), strict=True):
        assert same(r.values[ch], expected_value(x, ch))


@settings(max_examples=100, deadline=None)
@given(
    devices,
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**50), values, values, values),
        min_size=1,
        max_size=40,
    ),
)
def test_json_batch_round_trip(device: str, rows: list[tuple[int, int, float, float, float]]) -> None:
    payload = encode_json_batch(device, rows)
    assert b" " not in payload  # compact, like the single form
    items = parse_json_many(payload, f"edgewatch/sensors/{device}/telemetry", 2.0)
    assert len(items) == len(rows)
    for r, (seq, ts_ms, *vals) in zip(items, rows, strict=True):
        assert isinstance(r, Reading), r
        assert (r.device, r.seq, r.ts, r.received) == (device, seq, ts_ms / 1000, 2.0)
        for ch, x in zip(CH, vals, strict=True):
            assert same(r.values[ch], expected_value(x, ch))  # NaN -> null -> NaN, never 0


def test_batch_encoder_elements_are_the_single_payloads_readings() -> None:
    rows = [(42, 1764806400000, 41.27, 2.315, 3.204), (43, 1764806400100, 41.28, math.nan, 3.201)]
    doc = json.loads(encode_json_batch("pump-01", rows))
    assert list(doc) == ["v", "device", "batch"] and (doc["v"], doc["device"]) == (1, "pump-01")
    for el, row in zip(doc["batch"], rows, strict=True):
        single = json.loads(encode_json("pump-01", *row))
        assert el == {k: single[k] for k in ("seq", "ts", "values")}


def test_batch_encoder_refuses_what_the_decoder_rejects_whole() -> None:
    assert (wire.MAX_BATCH, wire.MAX_BATCH_BYTES) == (MAX_BATCH, MAX_PAYLOAD_BYTES)
    with pytest.raises(ValueError, match=r"1\.\.1000"):
        encode_json_batch("pump-01", [])
    with pytest.raises(ValueError, match=r"1\.\.1000"):
        encode_json_batch("pump-01", [(1, 1, 1.0, 1.0, 1.0)] * (MAX_BATCH + 1))
    with pytest.raises(ValueError, match="bytes"):  # 1000 readings of ours do not fit in 64 KiB
        encode_json_batch("pump-01", [(2**32 - 1, 1764806400000, -12.25, 10.5, 13.25)] * MAX_BATCH)


def _doc_batch_example() -> bytes:
    block = next(b for b in re.findall(r"```json\n(.*?)```", DOC, re.S) if '"batch"' in b)
    return block.encode()


def test_documented_batch_example_parses_and_matches_the_encoder() -> None:
    items = parse_json_many(_doc_batch_example(), "edgewatch/sensors/pump-01/telemetry", 0.0)
    assert [(r.seq, r.ts) for r in items] == [(42, 1764806400.0), (43, 1764806400.1)]  # type: ignore[union-attr]
    assert math.isnan(items[1].values["vibration"])  # type: ignore[union-attr]
    rows = [(42, 1764806400000, 41.27, 2.315, 3.204), (43, 1764806400100, 41.28, math.nan, 3.201)]
    assert json.loads(_doc_batch_example()) == json.loads(encode_json_batch("pump-01", rows))


def test_documented_limits_are_the_decoders() -> None:
    mqtt = DOC.split("## MQTT telemetry")[1].split("## CSV recording")[0]
    assert f"At most 4 KiB ({MAX_JSON_BYTES} bytes)" in mqtt
    assert f"at most 64 KiB ({MAX_PAYLOAD_BYTES} bytes)" in mqtt
    assert f"at most {MAX_BATCH} objects" in mqtt and f"up to {MAX_BATCH} readings" in mqtt
    assert "{v, device, seq, ts, values}" in mqtt and "{v, device, batch}" in mqtt


def test_seq_wraps_to_zero() -> None:
    r = parse_line(encode_line("pump-01", 2**32, 1000, 1, 2, 3), "p", 0.0)
    assert isinstance(r, Reading) and r.seq == 0


def test_nan_on_the_wire_is_rejected_by_validation_as_nan_not_zero() -> None:
    for r in (
        parse_line(encode_line("pump-01", 1, 1764806400000, math.nan, 2.0, 3.0), "p", 0.0),
        parse_json(encode_json("pump-01", 1, 1764806400000, math.nan, 2.0, 3.0), "s/pump-01/telemetry", 0.0),
    ):
        assert isinstance(r, Reading) and math.isnan(r.values["temperature"])
        checked = Validator().check(r, 1764806400.0)
        assert isinstance(checked, Reject) and checked.reason == "nan"


@pytest.mark.parametrize("seed", range(3))
def test_simulated_garbage_never_becomes_a_reading(seed: int) -> None:
    valid = encode_line("pump-01", 5, 1764806400000, 41.27, 2.315, 3.204)
    valid_json = encode_json("pump-01", 5, 1764806400000, 41.27, 2.315, 3.204)
    reasons = set()
    for seq in range(300):
        rng = garbage_rng(seed, 0, seq)
        r = parse_line(garbage_line(rng, valid), "p", 0.0)
        assert isinstance(r, Reject)
        reasons.add(r.reason)
        j = parse_json(garbage_payload(garbage_rng(seed, 1, seq), valid_json), "s/pump-01/telemetry", 0.0)
        assert isinstance(j, Reject)
    assert reasons == {"encoding", "checksum"}  # noise on the wire, or a flipped bit caught by the CRC


def test_documented_json_example_parses() -> None:
    block = re.search(r"```json\n(.*?)```", DOC, re.S)
    assert block
    r = parse_json(block.group(1).encode(), "edgewatch/sensors/pump-01/telemetry", 0.0)
    assert isinstance(r, Reading)
    assert r.values == {"temperature": 41.27, "vibration": 2.315, "pressure": 3.204}


def _doc_serial_example() -> bytes:
    m = re.search(r"Example: `(EW1,[^`]+)`", DOC)
    assert m
    return m.group(1).encode()


def test_documented_serial_example_matches_the_encoder_body() -> None:
    doc_line = _doc_serial_example()
    enc = encode_line("pump-01", 42, 1764806400000, 41.27, 2.315, 3.204)
    assert doc_line.split(b"*")[0] == enc.split(b"*")[0]


def test_documented_serial_example_parses() -> None:
    assert isinstance(parse_line(_doc_serial_example() + b"\n", "p", 0.0), Reading)


def test_reject_reasons_are_the_documented_ones() -> None:
    table = DOC.split("Parse-stage reasons")[1].split("Validation-stage")[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert documented == {"encoding", "too_long", "syntax", "checksum", "version", "schema"}
    produced = {
        parse_line(b"\xff\n", "p", 0.0).reason,  # type: ignore[union-attr]
        parse_line(b"x" * 300 + b"\n", "p", 0.0).reason,  # type: ignore[union-attr]
        parse_line(b"EW1,a\n", "p", 0.0).reason,  # type: ignore[union-attr]
        parse_line(b"EW1,a,1,1,1,1,1*00000000\n", "p", 0.0).reason,  # type: ignore[union-attr]
        parse_line(b"EW9,a,1,1,1,1,1*00000000\n", "p", 0.0).reason,  # type: ignore[union-attr]
        parse_json(json.dumps({"v": 1}).encode(), "t", 0.0).reason,  # type: ignore[union-attr]
    }
    assert produced == documented
