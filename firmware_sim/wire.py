"""Reference encoder of docs/protocol.md: serial lines, MQTT JSON payloads, and wire garbage.

Number formatting is fixed per channel (the sensor's resolution) so the same reading is written
identically to a serial line, a JSON payload and a CSV recording.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence

import numpy as np

MAGIC = "EW1"
DECIMALS = {"temperature": 2, "vibration": 3, "pressure": 3}
SEQ_MOD = 2**32
MAX_BATCH = 1000  # readings per batch payload (agent.parse.MAX_BATCH)
MAX_BATCH_BYTES = 65536  # bytes per MQTT payload (agent.parse.MAX_PAYLOAD_BYTES)

WireRow = tuple[int, int, float, float, float]  # seq, ts_ms, temperature, vibration, pressure


def format_value(x: float, decimals: int) -> str:
    """Decimal with fixed places; `nan` for NaN (never 0); never `-0.000`."""
    if math.isnan(x):
        return "nan"
    return f"{round(x, decimals) + 0.0:.{decimals}f}"


def encode_line(
    device: str, seq: int, ts_ms: int, temperature: float, vibration: float, pressure: float
) -> bytes:
    """One protocol line `EW1,<device>,<seq>,<ts_ms>,<t>,<v>,<p>*<CRC32>\\n` as ASCII bytes."""
    body = (
        f"{MAGIC},{device},{int(seq) % SEQ_MOD},{int(ts_ms)},"
        f"{format_value(temperature, 2)},{format_value(vibration, 3)},{format_value(pressure, 3)}"
    ).encode("ascii")
    return body + b"*%08X\n" % zlib.crc32(body)


def _json_value(x: float, decimals: int) -> float | None:
    return None if math.isnan(x) else round(float(x), decimals) + 0.0


def _json_reading(seq: int, ts_ms: int, temperature: float, vibration: float, pressure: float) -> dict:
    """seq, ts and values of one reading: the single payload's keys and a batch element alike."""
    return {
        "seq": int(seq) % SEQ_MOD,
        "ts": int(ts_ms),
        "values": {
            "temperature": _json_value(temperature, 2),
            "vibration": _json_value(vibration, 3),
            "pressure": _json_value(pressure, 3),
        },
    }


def encode_json(
    device: str, seq: int, ts_ms: int, temperature: float, vibration: float, pressure: float
) -> bytes:
    """One MQTT telemetry payload (UTF-8 JSON); NaN becomes null."""
    msg = {"v": 1, "device": device, **_json_reading(seq, ts_ms, temperature, vibration, pressure)}
    return json.dumps(msg, separators=(",", ":")).encode("utf-8")


def encode_json_batch(device: str, readings: Sequence[WireRow]) -> bytes:
    """One MQTT batch payload: several readings of one device, in the given order; NaN becomes null.

    Refuses what the decoder would reject as a whole (no reading, more than MAX_BATCH, over
    MAX_BATCH_BYTES), so a caller finds out here rather than from a counter on the gateway.
    """
    if not 1 <= len(readings) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1..{MAX_BATCH} readings, got {len(readings)}")
    msg = {"v": 1, "device": device, "batch": [_json_reading(*r) for r in readings]}
    out = json.dumps(msg, separators=(",", ":")).encode("utf-8")
    if len(out) > MAX_BATCH_BYTES:
        raise ValueError(f"batch payload of {len(out)} bytes (max {MAX_BATCH_BYTES}): send fewer readings")
    return out


def garbage_rng(seed: int, device: int, seq: int) -> np.random.Generator:
    """Per-reading generator, so garbage is the same whether recorded, streamed, or re-run."""
    return np.random.default_rng([seed, device, int(seq), 0x6A5B])


def garbage_line(rng: np.random.Generator, valid: bytes, kinds: tuple[int, ...] = (0, 1, 2)) -> bytes:
    """What a noisy line or a confused sensor puts on the wire instead of `valid`.

    One of: random bytes with non-ASCII in them; the valid line with one byte flipped (CRC fails);
    the valid line truncated and followed by line noise (0xFF bursts). Always one `\\n`-terminated
    line, so it costs the reader exactly one rejected line. `kinds` picks among the three (MQTT
    uses 0 and 2: a flipped byte in JSON could still parse).
    """
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == 0:
        n = int(rng.integers(8, 60))
        raw = rng.integers(0, 256, n, dtype=np.uint8)
        raw[raw == 0x0A] = 0xFE
        raw[raw == 0x0D] = 0xFD
        raw[int(rng.integers(n))] = 0x80 | int(rng.integers(128))  # at least one non-ASCII byte
        return raw.tobytes() + b"\n"
    body = bytearray(valid.rstrip(b"\n"))
    if kind == 1:
        star = body.rindex(b"*")
        i = int(rng.integers(4, star))  # inside the payload, after the magic
        flipped = body[i] ^ (1 << int(rng.integers(7)))
        body[i] = flipped if flipped not in (0x0A, 0x0D) else body[i] ^ 0x01
        return bytes(body) + b"\n"
    cut = int(rng.integers(5, len(body)))
    return bytes(body[:cut]) + b"\xff" * int(rng.integers(1, 6)) + b"\n"


def garbage_payload(rng: np.random.Generator, valid_json: bytes) -> bytes:
    """A corrupt MQTT payload (random or truncated bytes with non-ASCII in them): never a valid reading."""
    return garbage_line(rng, valid_json, kinds=(0, 2)).rstrip(b"\n")
