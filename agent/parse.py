"""Decode wire messages (docs/protocol.md) into Readings, or Rejects with a reason code.

This is the reference decoder of the protocol and sits on the hot path, so a well-formed serial line
is matched by one compiled regex (a few µs); only a line that fails it goes through the slower
diagnosis that picks the precise reason. Nothing here raises on any input: the wire is untrusted.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from collections.abc import Iterable

from agent.types import RawMessage, Reading, Reject

log = logging.getLogger(__name__)

SERIAL_CHANNELS: tuple[str, ...] = ("temperature", "vibration", "pressure")
MAX_LINE_BYTES = 256  # including the "\n" terminator
MAX_JSON_BYTES = 4096  # a single-reading MQTT payload
MAX_PAYLOAD_BYTES = 65536  # any MQTT payload, checked before decoding (a batch may use all of it)
MAX_BATCH = 1000  # readings in one batch payload
MAX_SEQ = 2**32 - 1
MAX_TS_MS = 2**53  # beyond this a float cannot hold the millisecond exactly
MAX_CHANNEL_NAME = 64
RAW_KEEP = 256  # bytes of the offending input kept in a Reject, for logs

_DEVICE = r"[A-Za-z0-9_.-]{1,32}"
_NUM = r"(?:[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan)"
_LINE_RE = re.compile(rf"EW1,({_DEVICE}),(\d{{1,10}}),(\d{{1,16}}),({_NUM}),({_NUM}),({_NUM})")
_DEVICE_RE = re.compile(_DEVICE)
_NUM_RE = re.compile(_NUM)
_INT_RE = re.compile(r"[-+]?\d+")
_MAGIC_RE = re.compile(r"EW(\d+),")
_CRC_RE = re.compile(r"[0-9A-F]{8}")
_JSON_KEYS = frozenset(("v", "device", "seq", "ts", "values"))  # the single-reading form
_BATCH_KEYS = frozenset(("v", "device", "batch"))  # the batch form
_ELEMENT_KEYS = frozenset(("seq", "ts", "values"))  # one reading of a batch
_SHAPES = "{v, device, seq, ts, values} (one reading) or {v, device, batch} (a batch)"


def _reject(reason: str, detail: str, raw: bytes, device: str | None = None) -> Reject:
    return Reject(reason=reason, detail=detail, device=device, raw=bytes(raw[:RAW_KEEP]))


def parse_line(line: bytes, origin: str, received: float) -> Reading | Reject:
    """One serial protocol line (with or without its ``\\n``/``\\r\\n``) -> Reading or Reject."""
    content = line[:-1] if line.endswith(b"\n") else line
    if content.endswith(b"\r"):
        content = content[:-1]
    if len(content) >= MAX_LINE_BYTES:
        return _reject(
            "too_long", f"line of {len(content)} bytes from {origin} (max {MAX_LINE_BYTES - 1})", line
        )
    try:
        text = content.decode("ascii")
    except UnicodeDecodeError as e:
        return _reject("encoding", f"non-ASCII byte at offset {e.start} from {origin}", line)
    body, star, crc = text.rpartition("*")
    if not star:
        if _MAGIC_RE.match(text) and not text.startswith("EW1,"):
            return _reject("version", f"magic {text.split(',', 1)[0]!r} is not EW1", line)
        return _reject("syntax", "no *<crc32> trailer", line)
    if not text.startswith("EW1,"):
        m = _MAGIC_RE.match(text)
        if m:
            return _reject("version", f"magic 'EW{m.group(1)}' is not EW1", line)
        return _reject("syntax", "line does not start with EW1,", line)
    if len(crc) != 8 or not _CRC_RE.fullmatch(crc):
        return _reject("syntax", f"checksum {crc[:16]!r} is not 8 upper-case hex digits", line)
    if zlib.crc32(body.encode("ascii")) != int(crc, 16):
        return _reject("checksum", f"CRC-32 mismatch (got {crc}) from {origin}", line)
    m = _LINE_RE.fullmatch(body)
    if m is None:
        return _diagnose_fields(body, line)
    device, seq_s, ts_s, t, v, p = m.groups()
    seq = int(seq_s)
    ts_ms = int(ts_s)
    if seq > MAX_SEQ:
        return _reject("schema", f"seq {seq} above 2^32-1", line, device)
    if ts_ms > MAX_TS_MS:
        return _reject("schema", f"ts_ms {ts_ms} out of range", line, device)
    return Reading(
        device=device,
        ts=ts_ms / 1000.0,
        values={"temperature": float(t), "vibration": float(v), "pressure": float(p)},
        seq=seq,
        received=received,
    )


def _diagnose_fields(body: str, line: bytes) -> Reject:
    """Slow path: say exactly which field of a checksum-valid line is wrong."""
    fields = body.split(",")
    if len(fields) != 4 + len(SERIAL_CHANNELS):
        return _reject("syntax", f"{len(fields)} fields, expected {4 + len(SERIAL_CHANNELS)}", line)
    _, device, seq_s, ts_s, *vals = fields
    if not _DEVICE_RE.fullmatch(device):
        return _reject("schema", f"device id {device[:40]!r} does not match {_DEVICE}", line)
    for name, s, limit in (("seq", seq_s, MAX_SEQ), ("ts_ms", ts_s, MAX_TS_MS)):
        if not _INT_RE.fullmatch(s):
            return _reject("syntax", f"{name} {s[:40]!r} is not an integer", line, device)
        n = int(s)
        if not 0 <= n <= limit:
            return _reject("schema", f"{name} {n} out of range 0..{limit}", line, device)
    for name, s in zip(SERIAL_CHANNELS, vals, strict=True):
        if not _NUM_RE.fullmatch(s):
            return _reject("syntax", f"{name} {s[:40]!r} is not a number", line, device)
    return _reject("syntax", "malformed line", line, device)  # e.g. a leading '+' on seq


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _decode(payload: bytes, topic: str) -> dict | Reject:
    """Size cap, UTF-8, JSON syntax and "is an object": the checks every payload shape shares."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return _reject(
            "too_long", f"payload of {len(payload)} bytes on {topic} (max {MAX_PAYLOAD_BYTES})", payload
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        return _reject("encoding", f"invalid UTF-8 at offset {e.start} on {topic}", payload)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        return _reject("syntax", f"invalid JSON on {topic}: {str(e)[:80]}", payload)
    if not isinstance(doc, dict):
        return _reject("schema", f"payload is a JSON {type(doc).__name__}, not an object", payload)
    return doc


def _key_mismatch(keys: Iterable[str], expected: frozenset[str]) -> str:
    missing = sorted(expected - set(keys))
    extra = sorted(k[:40] for k in set(keys) - expected)
    return f"missing {missing}, unexpected {extra}"


def _header(doc: dict, topic: str, payload: bytes) -> str | Reject:
    """`v` and `device` (and the device's topic level), shared by both shapes: the device, or why not."""
    v = doc["v"]
    if not _is_int(v):
        return _reject("schema", f"v must be an integer, got {type(v).__name__}", payload)
    if v != 1:
        return _reject("version", f"payload version {v if abs(v) < 10**6 else '(huge)'} is not 1", payload)
    device = doc["device"]
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        return _reject("schema", f"device {str(device)[:40]!r} does not match {_DEVICE}", payload)
    parts = topic.split("/")
    if len(parts) < 2 or parts[-2] != device:
        return _reject("schema", f"device {device!r} does not match topic {topic[:120]!r}", payload, device)
    return device


def _reading(el: dict, device: str, received: float, raw: bytes, where: str = "") -> Reading | Reject:
    """`seq`, `ts` and `values` of one reading: the single form's top level, or one batch element.

    One function for both, so a reading is judged by the same rules whichever shape carried it;
    `where` (``"batch[3]: "``) only prefixes the detail so a batch reject names its element.
    """
    seq, ts_ms = el["seq"], el["ts"]
    for name, x, limit in (("seq", seq, MAX_SEQ), ("ts", ts_ms, MAX_TS_MS)):
        if not _is_int(x):
            return _reject("schema", f"{where}{name} must be an integer, got {type(x).__name__}", raw, device)
        if not 0 <= x <= limit:
            return _reject("schema", f"{where}{name} out of range 0..{limit}", raw, device)
    raw_values = el["values"]
    if not isinstance(raw_values, dict) or not raw_values:
        return _reject("schema", f"{where}values must be a non-empty object", raw, device)
    values: dict[str, float] = {}
    for name, x in raw_values.items():
        if not name or len(name) > MAX_CHANNEL_NAME:
            return _reject("schema", f"{where}channel name {name[:40]!r} empty or too long", raw, device)
        if x is None:
            values[name] = math.nan  # null = no valid value: NaN, never 0
        elif isinstance(x, float) or _is_int(x):
            try:
                values[name] = float(x)
            except OverflowError:
                return _reject("schema", f"{where}{name} value too large for a float", raw, device)
        else:
            return _reject(
                "schema", f"{where}{name} must be a number or null, got {type(x).__name__}", raw, device
            )
    return Reading(device=device, ts=ts_ms / 1000.0, values=values, seq=seq, received=received)


def _element_raw(el: object, payload: bytes) -> bytes:
    """The bad element itself for the reject's log excerpt (the payload's head is other readings)."""
    try:
        return json.dumps(el, separators=(",", ":"))[:RAW_KEEP].encode("utf-8", "replace")
    except (ValueError, TypeError, RecursionError):
        return payload


def _batch(doc: dict, device: str, received: float, payload: bytes, topic: str) -> list[Reading | Reject]:
    """The elements of a batch payload in order: each one a Reading or its own Reject."""
    batch = doc["batch"]
    if not isinstance(batch, list):
        return [_reject("schema", f"batch must be an array, got {type(batch).__name__}", payload, device)]
    if not 1 <= len(batch) <= MAX_BATCH:
        return [
            _reject(
                "schema", f"batch of {len(batch)} readings on {topic[:120]} (1..{MAX_BATCH})", payload, device
            )
        ]
    out: list[Reading | Reject] = []
    for i, el in enumerate(batch):
        where = f"batch[{i}]: "
        item: Reading | Reject
        if not isinstance(el, dict):
            item = _reject("schema", f"{where}a JSON {type(el).__name__}, not an object", payload, device)
        elif el.keys() != _ELEMENT_KEYS:
            item = _reject(
                "schema", f"{where}keys: {_key_mismatch(el.keys(), _ELEMENT_KEYS)}", payload, device
            )
        else:
            item = _reading(el, device, received, payload, where)
        if isinstance(item, Reject):
            item.raw = _element_raw(el, payload)
        out.append(item)
    return out


def parse_json_many(payload: bytes, topic: str, received: float) -> list[Reading | Reject]:
    """One MQTT telemetry payload from `topic` (``<prefix>/<device>/telemetry``), single or batch form,
    -> its readings in order. A bad batch element is one Reject in its place; a payload that fails as
    a whole (size, UTF-8, JSON, keys, version, device, batch shape) is one Reject for all of it."""
    doc = _decode(payload, topic)
    if isinstance(doc, Reject):
        return [doc]
    keys = doc.keys()
    if keys == _JSON_KEYS:
        if len(payload) > MAX_JSON_BYTES:  # the single form keeps its own, smaller cap
            return [
                _reject(
                    "too_long",
                    f"single-reading payload of {len(payload)} bytes on {topic} (max {MAX_JSON_BYTES})",
                    payload,
                )
            ]
        device = _header(doc, topic, payload)
        if isinstance(device, Reject):
            return [device]
        return [_reading(doc, device, received, payload)]
    if keys == _BATCH_KEYS:
        device = _header(doc, topic, payload)
        if isinstance(device, Reject):
            return [device]
        return _batch(doc, device, received, payload, topic)
    if "batch" in keys:
        detail = f"keys: {_key_mismatch(keys, _BATCH_KEYS)} (batch form)"
    else:
        detail = f"keys: {_key_mismatch(keys, _JSON_KEYS)}"
    detail += f"; a payload has exactly {_SHAPES}"
    return [_reject("schema", detail, payload)]


def parse_json(payload: bytes, topic: str, received: float) -> Reading | Reject:
    """One payload that must carry one reading (the single form, or a batch of one element).

    For callers that handle exactly one reading per message (tests, tools); the agent itself uses
    `parse_json_many`. A batch of several readings is refused here rather than cut to its first.
    """
    items = parse_json_many(payload, topic, received)
    if len(items) == 1:
        return items[0]
    return _reject(
        "schema", f"batch of {len(items)} readings where one was expected (use parse_json_many)", payload
    )


def parse_many(msg: RawMessage) -> list[Reading | Reject]:
    """Dispatch on the source kind: every reading a message carries, in order (a serial line and a
    single-form payload carry one; a batch payload up to MAX_BATCH). Never raises: an unexpected
    parser error becomes one Reject for the message."""
    try:
        if msg.kind == "serial":
            return [parse_line(msg.payload, msg.origin, msg.received)]
        if msg.kind == "mqtt":
            return parse_json_many(msg.payload, msg.origin, msg.received)
        return [_reject("schema", f"unknown message kind {msg.kind!r}", msg.payload)]
    except Exception as e:  # a bug, not bad input: keep running, but say so loudly
        log.exception("parser error on input from %s", msg.origin)
        return [_reject("syntax", f"parser error: {type(e).__name__}", msg.payload)]


def parse(msg: RawMessage) -> Reading | Reject:
    """A message that must carry one reading (tests, tools); see `parse_json` for a batch payload."""
    items = parse_many(msg)
    if len(items) == 1:
        return items[0]
    return _reject(
        "schema", f"batch of {len(items)} readings where one was expected (use parse_many)", msg.payload
    )
