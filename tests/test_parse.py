"""Wire decoder: every reject reason, both transports, and a never-raises property over arbitrary input."""

from __future__ import annotations

import json
import math
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.parse import (
    MAX_BATCH,
    MAX_JSON_BYTES,
    MAX_PAYLOAD_BYTES,
    parse,
    parse_json,
    parse_json_many,
    parse_line,
    parse_many,
)
from agent.types import RawMessage, Reading, Reject

TOPIC = "edgewatch/sensors/pump-01/telemetry"


def line(body: str, crc: str | None = None, end: bytes = b"\n") -> bytes:
    """A protocol line with a correct CRC unless one is given."""
    crc = crc if crc is not None else f"{zlib.crc32(body.encode()):08X}"
    return f"{body}*{crc}".encode() + end


def payload(**over: object) -> bytes:
    doc: dict = {
        "v": 1,
        "device": "pump-01",
        "seq": 42,
        "ts": 1764806400000,
        "values": {"temperature": 41.27, "vibration": 2.315, "pressure": 3.204},
    }
    doc.update(over)
    return json.dumps(doc).encode()


def test_serial_example_decodes() -> None:
    r = parse_line(line("EW1,pump-01,42,1764806400000,41.27,2.315,3.204"), "/dev/ttyUSB0", 123.0)
    assert isinstance(r, Reading)
    assert (r.device, r.seq, r.ts, r.received) == ("pump-01", 42, 1764806400.0, 123.0)
    assert r.values == {"temperature": 41.27, "vibration": 2.315, "pressure": 3.204}


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b""])
def test_terminators(end: bytes) -> None:
    assert isinstance(parse_line(line("EW1,a,0,0,1,2,3", end=end), "p", 0.0), Reading)


def test_nan_passes_parse_as_nan_never_zero() -> None:
    r = parse_line(line("EW1,a,1,1000,nan,2.5,-1e-3"), "p", 0.0)
    assert isinstance(r, Reading)
    assert math.isnan(r.values["temperature"])
    assert r.values["pressure"] == -0.001


def test_line_length_cap() -> None:
    base = "EW1,a,1,1000,1,2,"
    ok_body = base + "3" * (255 - len(base) - 9)  # 255 bytes before "\n"
    assert len(line(ok_body)) == 256
    assert isinstance(parse_line(line(ok_body), "p", 0.0), Reading)
    long_body = ok_body + "3"
    r = parse_line(line(long_body), "p", 0.0)
    assert isinstance(r, Reject) and r.reason == "too_long"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfeEW1,a,1,1,1,1,1*00000000\n", "encoding"),
        (b"EW1,a,1,1,1,1,1\n", "syntax"),  # no trailer
        (line("EW1,a,1,1,1,1,1", crc="deadbeef"), "syntax"),  # lower-case hex
        (line("EW1,a,1,1,1,1,1", crc="DEADBEE"), "syntax"),  # 7 digits
        (line("EW1,a,1,1,1,1,1", crc="DEADBEEF"), "checksum"),
        (line("EW2,a,1,1,1,1,1"), "version"),
        (b"EW2,whatever,no,trailer\n", "version"),
        (line("XX1,a,1,1,1,1,1"), "syntax"),
        (line("EW1,a,1,1,1,1"), "syntax"),  # a field missing
        (line("EW1,a,1,1,1,1,1,1"), "syntax"),  # one too many
        (line("EW1,a,1,1,abc,1,1"), "syntax"),
        (line("EW1,a,1,1,inf,1,1"), "syntax"),  # only decimals and nan
        (line("EW1,a,x,1,1,1,1"), "syntax"),
        (line("EW1,bad device,1,1,1,1,1"), "schema"),
        (line("EW1," + "d" * 33 + ",1,1,1,1,1"), "schema"),
        (line("EW1,a,-1,1,1,1,1"), "schema"),
        (line(f"EW1,a,{2**32},1,1,1,1"), "schema"),
        (line("EW1,a,1,-5,1,1,1"), "schema"),
        (line(f"EW1,a,1,{2**60},1,1,1"), "schema"),
    ],
)
def test_serial_reject_reasons(raw: bytes, reason: str) -> None:
    r = parse_line(raw, "/dev/ttyUSB0", 0.0)
    assert isinstance(r, Reject), r
    assert r.reason == reason, r.detail
    assert r.detail
    assert r.raw == raw[:256]


def test_single_bit_flip_is_caught() -> None:
    good = line("EW1,pump-01,42,1764806400000,41.27,2.315,3.204")
    bad = good.replace(b"41.27", b"41.37")
    assert parse_line(bad, "p", 0.0).reason == "checksum"  # type: ignore[union-attr]


def test_seq_wrap_limit_accepted() -> None:
    r = parse_line(line(f"EW1,a,{2**32 - 1},1,1,1,1"), "p", 0.0)
    assert isinstance(r, Reading) and r.seq == 2**32 - 1


def test_json_example_decodes() -> None:
    r = parse_json(payload(), TOPIC, 5.0)
    assert isinstance(r, Reading)
    assert (r.device, r.seq, r.ts, r.received) == ("pump-01", 42, 1764806400.0, 5.0)
    assert r.values == {"temperature": 41.27, "vibration": 2.315, "pressure": 3.204}


def test_json_null_is_nan_and_free_channels() -> None:
    r = parse_json(payload(values={"temperature": None, "flow": 3}), TOPIC, 0.0)
    assert isinstance(r, Reading)
    assert math.isnan(r.values["temperature"])
    assert r.values["flow"] == 3.0


@pytest.mark.parametrize(
    ("raw", "topic", "reason"),
    [
        (b"x" * 65537, TOPIC, "too_long"),
        (b'{"v": 1, "device": "\xff"}', TOPIC, "encoding"),
        (b"{not json", TOPIC, "syntax"),
        (b"[" * 33000 + b"]" * 33000, TOPIC, "too_long"),
        (b"[" * 2000 + b"]" * 2000, TOPIC, "syntax"),  # too deep for the decoder
        (b"[1, 2]", TOPIC, "schema"),
        (payload(v=2), TOPIC, "version"),
        (payload(v="1"), TOPIC, "schema"),
        (payload(v=True), TOPIC, "schema"),
        (payload(extra=1), TOPIC, "schema"),
        (json.dumps({"v": 1, "device": "pump-01", "seq": 1, "ts": 1}).encode(), TOPIC, "schema"),
        (payload(device="pump-02"), TOPIC, "schema"),
        (payload(device="bad id"), TOPIC, "schema"),
        (payload(seq=-1), TOPIC, "schema"),
        (payload(seq=2**32), TOPIC, "schema"),
        (payload(seq=1.0), TOPIC, "schema"),
        (payload(ts=1764806400000.5), TOPIC, "schema"),
        (payload(ts=10**400), TOPIC, "schema"),
        (payload(values={}), TOPIC, "schema"),
        (payload(values=[1, 2]), TOPIC, "schema"),
        (payload(values={"temperature": "41"}), TOPIC, "schema"),
        (payload(values={"temperature": True}), TOPIC, "schema"),
        (payload(values={"temperature": 10**400}), TOPIC, "schema"),
        (payload(values={"": 1.0}), TOPIC, "schema"),
        (payload(), "telemetry", "schema"),
    ],
)
def test_json_reject_reasons(raw: bytes, topic: str, reason: str) -> None:
    r = parse_json(raw, topic, 0.0)
    assert isinstance(r, Reject), r
    assert r.reason == reason, r.detail
    assert len(r.raw or b"") <= 256


def test_json_nan_literal_reaches_validation_as_nan() -> None:
    r = parse_json(b'{"v":1,"device":"pump-01","seq":1,"ts":1,"values":{"t":NaN,"u":-Infinity}}', TOPIC, 0.0)
    assert isinstance(r, Reading)
    assert math.isnan(r.values["t"]) and r.values["u"] == -math.inf


def test_parse_dispatches_on_kind() -> None:
    assert isinstance(parse(RawMessage(line("EW1,a,1,1,1,1,1"), "serial", "p", 0.0)), Reading)
    assert isinstance(parse(RawMessage(payload(), "mqtt", TOPIC, 0.0)), Reading)
    r = parse(RawMessage(b"", "carrier-pigeon", "p", 0.0))
    assert isinstance(r, Reject) and r.reason == "schema"


# --- batch payloads -------------------------------------------------------------------------------


def element(n: int = 42, /, **over: object) -> dict:
    """Batch element n: the single example's reading moved on by n - 42 samples, unless overridden."""
    el: dict = {
        "seq": n,
        "ts": 1764806400000 + 100 * (n - 42),
        "values": {"temperature": 41.27, "vibration": 2.315, "pressure": 3.204},
    }
    el.update(over)
    return el


def batch(elements: list, **over: object) -> bytes:
    doc: dict = {"v": 1, "device": "pump-01", "batch": elements}
    doc.update(over)
    return json.dumps(doc).encode()


def test_batch_decodes_every_reading_in_order_with_the_message_time() -> None:
    items = parse_json_many(batch([element(42), element(43), element(44)]), TOPIC, 7.0)
    assert all(isinstance(r, Reading) for r in items)
    assert [(r.device, r.seq, r.ts, r.received) for r in items] == [  # type: ignore[union-attr]
        ("pump-01", 42, 1764806400.0, 7.0),
        ("pump-01", 43, 1764806400.1, 7.0),
        ("pump-01", 44, 1764806400.2, 7.0),
    ]
    assert items[0].values == {"temperature": 41.27, "vibration": 2.315, "pressure": 3.204}  # type: ignore[union-attr]


def test_batch_null_is_nan_never_zero() -> None:
    items = parse_json_many(batch([element(values={"vibration": None, "flow": 0})]), TOPIC, 0.0)
    assert len(items) == 1 and isinstance(items[0], Reading)
    assert math.isnan(items[0].values["vibration"]) and items[0].values["flow"] == 0.0


# (fault as batch element, the same fault in a single-form payload): same reason, same detail text
ELEMENT_FAULTS = [
    ({"seq": -1}, {"seq": -1}),
    ({"seq": 2**32}, {"seq": 2**32}),
    ({"seq": 1.0}, {"seq": 1.0}),
    ({"ts": 1764806400000.5}, {"ts": 1764806400000.5}),
    ({"ts": 10**400}, {"ts": 10**400}),
    ({"values": {}}, {"values": {}}),
    ({"values": [1, 2]}, {"values": [1, 2]}),
    ({"values": {"temperature": "41"}}, {"values": {"temperature": "41"}}),
    ({"values": {"temperature": True}}, {"values": {"temperature": True}}),
    ({"values": {"temperature": 10**400}}, {"values": {"temperature": 10**400}}),
    ({"values": {"": 1.0}}, {"values": {"": 1.0}}),
]


@pytest.mark.parametrize(("fault", "single"), ELEMENT_FAULTS)
def test_a_bad_element_rejects_only_itself_with_the_single_forms_reason(fault: dict, single: dict) -> None:
    items = parse_json_many(batch([element(42), element(43, **fault), element(44)]), TOPIC, 1.0)
    assert [type(r).__name__ for r in items] == ["Reading", "Reject", "Reading"]
    assert [r.seq for r in items if isinstance(r, Reading)] == [42, 44]  # kept, in order
    bad = items[1]
    assert isinstance(bad, Reject) and bad.device == "pump-01"
    alone = parse_json(payload(**single), TOPIC, 1.0)
    assert isinstance(alone, Reject)
    assert bad.reason == alone.reason == "schema"
    assert bad.detail == f"batch[1]: {alone.detail}"  # the same check, naming the element
    assert bad.raw and len(bad.raw) <= 256 and b'"ts"' in bad.raw  # the element, not the payload head


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        "reading",
        None,
        {"seq": 43, "ts": 1764806400100},  # values missing
        element(43) | {"device": "pump-01"},  # an element may not carry the header's keys
        element(43) | {"v": 1},
    ],
)
def test_an_element_that_is_not_exactly_seq_ts_values_is_one_schema_reject(bad: object) -> None:
    items = parse_json_many(batch([element(42), bad, element(44)]), TOPIC, 0.0)
    assert [type(r).__name__ for r in items] == ["Reading", "Reject", "Reading"]
    assert items[1].reason == "schema" and items[1].detail.startswith("batch[1]: ")  # type: ignore[union-attr]


def test_every_bad_element_is_counted_once_with_its_index() -> None:
    els = [element(i) for i in range(42, 52)]
    els[0] = element(42, seq=-1)
    els[5] = element(47, values={})
    els[9] = "x"
    items = parse_json_many(batch(els), TOPIC, 0.0)
    assert len(items) == 10
    rejects = [r for r in items if isinstance(r, Reject)]
    assert [r.detail.split(":")[0] for r in rejects] == ["batch[0]", "batch[5]", "batch[9]"]
    assert [r.seq for r in items if isinstance(r, Reading)] == [43, 44, 45, 46, 48, 49, 50]  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "topic", "reason"),
    [
        (batch([element()], v=2), TOPIC, "version"),
        (batch([element()], v="1"), TOPIC, "schema"),
        (batch([element()], device="pump-02"), TOPIC, "schema"),  # device/topic rule
        (batch([element()], device="bad id"), TOPIC, "schema"),
        (batch([element()]), "telemetry", "schema"),
        (batch([element()], extra=1), TOPIC, "schema"),
        (batch([element()], seq=42), TOPIC, "schema"),  # a mix of both forms
        (batch(element()), TOPIC, "schema"),  # an object, not an array
        (batch("[]"), TOPIC, "schema"),
        (batch([]), TOPIC, "schema"),
        (batch([{"seq": 1, "ts": 1, "values": {"t": 1}}] * (MAX_BATCH + 1)), TOPIC, "schema"),
        (b'{"v":1,"device":"pump-01","batch":[{"seq":1,"ts":1,"values":{"t":1}},\xff]}', TOPIC, "encoding"),
        (b'{"v":1,"device":"pump-01","batch":[{"seq":1,"ts":1,"values":{"t":1}},]}', TOPIC, "syntax"),
        (json.dumps({"v": 1, "device": "pump-01"}).encode(), TOPIC, "schema"),
    ],
)
def test_a_payload_that_fails_as_a_whole_is_one_reject(raw: bytes, topic: str, reason: str) -> None:
    items = parse_json_many(raw, topic, 0.0)
    assert len(items) == 1 and isinstance(items[0], Reject), items
    assert items[0].reason == reason, items[0].detail


def test_wrong_key_sets_name_both_allowed_shapes() -> None:
    for raw in (payload(extra=1), batch([element()], seq=1), json.dumps({"v": 1}).encode()):
        r = parse_json(raw, TOPIC, 0.0)
        assert isinstance(r, Reject) and r.reason == "schema"
        assert "{v, device, seq, ts, values}" in r.detail and "{v, device, batch}" in r.detail, r.detail
    r = parse_json(batch([element()], seq=1), TOPIC, 0.0)
    assert "unexpected ['seq']" in r.detail  # type: ignore[union-attr]  # judged against the batch form


def test_batch_limits_are_inclusive() -> None:
    small = {"seq": 1, "ts": 1, "values": {"t": 1}}
    els = [dict(small, seq=i, ts=i) for i in range(MAX_BATCH)]
    raw = batch(els)
    assert len(raw) <= MAX_PAYLOAD_BYTES
    items = parse_json_many(raw, TOPIC, 0.0)
    assert len(items) == MAX_BATCH and all(isinstance(r, Reading) for r in items)
    assert isinstance(parse_json(batch([small]), TOPIC, 0.0), Reading)  # a batch of one


def _padded_batch(size: int) -> bytes:
    """A valid batch payload of exactly `size` bytes (padding in the JSON whitespace)."""
    raw = batch([element(42 + i) for i in range(5)])
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def _padded_single(size: int) -> bytes:
    raw = payload()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_size_rule_single_4k_batch_64k_checked_before_decoding() -> None:
    assert (MAX_JSON_BYTES, MAX_PAYLOAD_BYTES) == (4096, 65536)
    # single form: 4 KiB as before, even though it is valid JSON
    assert isinstance(parse_json(_padded_single(MAX_JSON_BYTES), TOPIC, 0.0), Reading)
    r = parse_json(_padded_single(MAX_JSON_BYTES + 1), TOPIC, 0.0)
    assert isinstance(r, Reject) and r.reason == "too_long" and "single-reading" in r.detail
    # batch form: up to 64 KiB
    ok = parse_json_many(_padded_batch(MAX_PAYLOAD_BYTES), TOPIC, 0.0)
    assert len(ok) == 5 and all(isinstance(x, Reading) for x in ok)
    over = parse_json_many(_padded_batch(MAX_PAYLOAD_BYTES + 1), TOPIC, 0.0)
    assert len(over) == 1 and over[0].reason == "too_long"  # type: ignore[union-attr]
    # over 64 KiB nothing is decoded: even garbage is too_long, and the reject keeps little
    junk = parse_json_many(b"\xff" * (MAX_PAYLOAD_BYTES + 1), TOPIC, 0.0)
    assert junk[0].reason == "too_long" and len(junk[0].raw or b"") <= 256  # type: ignore[union-attr]
    # between 4 KiB and 64 KiB the shape decides: junk there is what it is, not too_long
    assert parse_json(b"x" * (MAX_JSON_BYTES + 1), TOPIC, 0.0).reason == "syntax"  # type: ignore[union-attr]
    assert parse_json(b"\xff" * (MAX_JSON_BYTES + 1), TOPIC, 0.0).reason == "encoding"  # type: ignore[union-attr]


def test_parse_many_gives_one_item_per_line_and_every_reading_of_a_batch() -> None:
    serial = parse_many(RawMessage(line("EW1,a,1,1,1,1,1"), "serial", "p", 3.0))
    assert len(serial) == 1 and isinstance(serial[0], Reading) and serial[0].received == 3.0
    items = parse_many(RawMessage(batch([element(1), element(2)]), "mqtt", TOPIC, 3.0))
    assert [r.seq for r in items] == [1, 2]  # type: ignore[union-attr]
    # the one-reading helpers refuse a batch of several rather than return its first reading
    for r in (parse(RawMessage(batch([element(1), element(2)]), "mqtt", TOPIC, 0.0)),
              parse_json(batch([element(1), element(2)]), TOPIC, 0.0)):  # fmt: skip
        assert isinstance(r, Reject) and r.reason == "schema" and "batch of 2" in r.detail


# --- properties: nothing raises, whatever arrives ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_parse_line_never_raises_on_bytes(raw: bytes) -> None:
    r = parse_line(raw, "p", 0.0)
    assert isinstance(r, Reading | Reject)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="ascii"), max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.lists(
        st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.text(max_size=6) | st.just("nan"),
        min_size=0,
        max_size=5,
    ),
)
def test_parse_line_never_raises_on_checksum_valid_lines(
    dev: str, seq: int, ts: int, vals: list[str]
) -> None:
    """Lines with a correct CRC reach the field checks; those must hold for any field content."""
    body = ",".join(["EW1", dev, str(seq), str(ts), *vals])
    r = parse_line(line(body), "p", 0.0)
    assert isinstance(r, Reading | Reject)
    if isinstance(r, Reading):
        assert 0 <= r.seq <= 2**32 - 1  # type: ignore[operator]
        assert set(r.values) == {"temperature", "vibration", "pressure"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000))
def test_parse_json_never_raises_on_bytes(raw: bytes) -> None:
    assert isinstance(parse_json(raw, TOPIC, 0.0), Reading | Reject)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "device", "seq", "ts", "values", "x"]) | st.text(max_size=5),
        json_values,
        max_size=7,
    ),
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    st.booleans(),
)
def test_parse_json_never_raises_on_documents(doc: dict, values: dict, use_values: bool) -> None:
    if use_values:
        doc["values"] = values
    raw = json.dumps(doc).encode()
    r = parse_json(raw, TOPIC, 0.0)
    assert isinstance(r, Reading | Reject)
    if isinstance(r, Reading):
        assert r.device == "pump-01"
        assert all(isinstance(v, float) for v in r.values.values())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["serial", "mqtt", "other"]), st.text(max_size=50))
def test_parse_never_raises(raw: bytes, kind: str, origin: str) -> None:
    r = parse(RawMessage(raw, kind, origin, 0.0))
    assert isinstance(r, Reading | Reject)
    # parse() turns a parser bug into a reject; bad input must be rejected for a reason, not by that net
    assert not (isinstance(r, Reject) and r.detail.startswith("parser error"))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["seq", "ts", "values", "v"]) | st.text(max_size=4), json_values, max_size=4
        )
        | json_values,
        max_size=6,
    ),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
def test_parse_json_many_never_raises_on_batches(elements: list, values: dict) -> None:
    els = [*elements, {"seq": 1, "ts": 1, "values": values}]
    items = parse_json_many(batch(els), TOPIC, 0.0)
    assert len(items) == len(els)  # the header is good: one item per element, never more
    for r in items:
        assert isinstance(r, Reading | Reject)
        assert not (isinstance(r, Reject) and not r.detail.startswith("batch["))
        if isinstance(r, Reading):
            assert r.device == "pump-01" and all(isinstance(v, float) for v in r.values.values())
