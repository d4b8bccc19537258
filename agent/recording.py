"""Read recordings (simulator CSV, agent export, SKAB CSV) into per-device arrays.

Torch-free so that replay runs on a gateway. Missing values (empty field, `nan`) stay NaN: a gap is
never turned into 0. Ground-truth labels, when the file has them, come along for evaluation but
never enter the pipeline.
"""

from __future__ import annotations

import csv
import heapq
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from agent.types import Reading

LABEL_COLUMNS = ("machine_state", "fault", "sensor_fault")
SKAB_CHANNELS = [
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
]


class RecordingError(ValueError):
    """A recording that cannot be read; the message names the file and line."""


@dataclass
class Recording:
    """One device's readings from one file, in time order."""

    device: str
    channels: list[str]
    ts: np.ndarray  # float64 seconds since the Unix epoch, UTC
    values: np.ndarray  # float64 [n, channels]; NaN = missing
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # column -> array (str or float)
    source: str = ""
    # False where every channel field was empty: nothing arrived (dropout, garbage on the wire).
    # Replay skips those rows, exactly as the live agent never sees a reading for them.
    arrived: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ts)

    def anomalous(self) -> np.ndarray | None:
        """Boolean ground truth per row (simulator: fault or not normal; SKAB: anomaly == 1)."""
        if "anomaly" in self.labels:
            return self.labels["anomaly"] > 0.5
        if "machine_state" in self.labels:
            state = self.labels["machine_state"]
            has_state = state != ""
            if not has_state.any():
                return None
            return (state != "normal") & has_state
        return None


def _parse_iso(text: str) -> float:
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:  # naive times (SKAB) are taken as UTC
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_time(text: str | None) -> float | None:
    """A command-line time: epoch seconds or ISO 8601 (naive = UTC); None passes through."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return _parse_iso(text)


def iso_utc(ts: float) -> str:
    """Epoch seconds as `YYYY-MM-DDTHH:MM:SSZ`, for summaries and reports."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _float(text: str) -> float:
    return float(text) if text not in ("", "nan", "NaN") else float("nan")


def _read_text(path: Path) -> str:
    try:
        # newline="" would keep \r; universal newlines accept both LF and CRLF files.
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordingError(f"{path}: cannot read: {exc}") from exc


def sniff_format(header: str) -> str:
    if header.startswith("datetime;"):
        return "skab"
    if header.split(",")[:2] == ["ts", "device"]:
        return "sim"
    raise RecordingError(f"unknown recording format (header {header[:80]!r})")


def read_recording(path: str | Path, channels: Sequence[str] | None = None) -> list[Recording]:
    """Read a simulator/export CSV (one Recording per device) or a SKAB CSV (one Recording)."""
    path = Path(path)
    text = _read_text(path)
    header = text.split("\n", 1)[0].strip()
    fmt = sniff_format(header)
    if fmt == "skab":
        return [read_skab(path, text=text, channels=channels)]
    return read_sim(path, text=text, channels=channels)


def read_sim(
    path: Path, *, text: str | None = None, channels: Sequence[str] | None = None
) -> list[Recording]:
    text = _read_text(path) if text is None else text
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    if header[:2] != ["ts", "device"]:
        raise RecordingError(f"{path}: expected columns ts,device,... got {header[:3]}")
    label_idx = {c: header.index(c) for c in LABEL_COLUMNS if c in header}
    value_cols = [c for c in header[2:] if c not in LABEL_COLUMNS]
    wanted = list(channels) if channels else value_cols
    missing = [c for c in wanted if c not in header]
    if missing:
        raise RecordingError(f"{path}: channel(s) {missing} not in the header {header}")
    idx = [header.index(c) for c in wanted]
    per_device: dict[str, dict[str, list]] = {}
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise RecordingError(f"{path}:{lineno}: {len(row)} fields, header has {len(header)}")
        try:
            ts = _parse_iso(row[0])
            vals = [_float(row[i]) for i in idx]
        except ValueError as exc:
            raise RecordingError(f"{path}:{lineno}: {exc}") from exc
        d = per_device.setdefault(
            row[1], {"ts": [], "values": [], "arrived": [], **{c: [] for c in label_idx}}
        )
        d["ts"].append(ts)
        d["values"].append(vals)
        d["arrived"].append(any(row[i] != "" for i in idx))
        for c, i in label_idx.items():
            d[c].append(row[i])
    out = []
    for device, d in per_device.items():
        ts = np.asarray(d["ts"], dtype=np.float64)
        order = np.argsort(ts, kind="stable")
        values = np.asarray(d["values"], dtype=np.float64).reshape(len(ts), len(wanted))
        labels = {c: np.asarray(d[c], dtype=object)[order].astype(str) for c in label_idx}
        arrived = np.asarray(d["arrived"], dtype=bool)[order]
        out.append(Recording(device, wanted, ts[order], values[order], labels, str(path), arrived))
    return out


def read_skab(
    path: Path, *, text: str | None = None, channels: Sequence[str] | None = None, device: str | None = None
) -> Recording:
    """SKAB: `;`-separated, `datetime` column, LF or CRLF, optional `anomaly`/`changepoint` labels."""
    text = _read_text(path) if text is None else text
    reader = csv.reader(io.StringIO(text), delimiter=";")
    header = [h.strip() for h in next(reader)]
    if not header or header[0] != "datetime":
        raise RecordingError(f"{path}: not a SKAB file (first column {header[:1]})")
    wanted = list(channels) if channels else [c for c in SKAB_CHANNELS if c in header]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise RecordingError(f"{path}: channel(s) {missing} not in the header {header}")
    idx = [header.index(c) for c in wanted]
    label_idx = {c: header.index(c) for c in ("anomaly", "changepoint") if c in header}
    ts, values, labels = [], [], {c: [] for c in label_idx}
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            ts.append(_parse_iso(row[0].strip()))
            values.append([_float(row[i].strip()) for i in idx])
            for c, i in label_idx.items():
                labels[c].append(float(row[i]))
        except (ValueError, IndexError) as exc:
            raise RecordingError(f"{path}:{lineno}: {exc}") from exc
    name = device or f"{path.parent.name}-{path.stem}"
    return Recording(
        name,
        wanted,
        np.asarray(ts, dtype=np.float64),
        np.asarray(values, dtype=np.float64).reshape(len(ts), len(wanted)),
        {c: np.asarray(v, dtype=np.float64) for c, v in labels.items()},
        str(path),
    )


def stored_readings(
    db_path: str | Path,
    devices: Sequence[str] | None = None,
    since: float | None = None,
    until: float | None = None,
) -> dict[str, list[Reading]]:
    """Readings an agent committed to its database, per device, in [since, until)."""
    from agent.buffer import Buffer, BufferConfig
    from agent.db import open_db

    db = open_db(db_path)
    try:
        buf = Buffer(db, BufferConfig())
        lo = float("-inf") if since is None else since
        hi = float("inf") if until is None else until
        return {d: rows for d in (devices or buf.devices()) if (rows := buf.readings_between(d, lo, hi))}
    finally:
        db.conn.close()


def iter_readings(recordings: Sequence[Recording]) -> Iterator[Reading]:
    """All readings of all recordings, merged in time order (ties: recording order)."""
    picks = [np.arange(len(r)) if r.arrived is None else np.flatnonzero(r.arrived) for r in recordings]
    stamps = [r.ts[rows] for r, rows in zip(recordings, picks, strict=True)]
    if not all(np.all(np.diff(t) >= 0) for t in stamps):  # NaN or unsorted: merge as the file says
        yield from _merged_in_file_order(recordings, picks)
        return
    # Sorted inputs (the usual case): their merge is one sort by (ts, recording, row), done by numpy
    # instead of a heap of generators, and each row's values converted once with tolist().
    ts = np.concatenate(stamps) if stamps else np.empty(0)
    ks = np.concatenate([np.full(len(p), k) for k, p in enumerate(picks)]) if picks else np.empty(0, int)
    rows = np.concatenate(picks) if picks else np.empty(0, int)
    order = np.lexsort((rows, ks, ts))
    values = [r.values.tolist() for r in recordings]
    devices = [r.device for r in recordings]
    channels = [r.channels for r in recordings]
    for t, k, i in zip(ts[order].tolist(), ks[order].tolist(), rows[order].tolist(), strict=True):
        yield Reading(devices[k], t, dict(zip(channels[k], values[k][i], strict=True)))


def _merged_in_file_order(recordings: Sequence[Recording], picks: list[np.ndarray]) -> Iterator[Reading]:
    """heapq.merge of the recordings' rows, each recording in its own (file) order."""

    def one(k: int, rec: Recording) -> Iterator[tuple[float, int, int]]:
        for i in picks[k]:
            yield (float(rec.ts[i]), k, int(i))

    for ts, k, i in heapq.merge(*(one(k, r) for k, r in enumerate(recordings))):
        rec = recordings[k]
        row = rec.values[i]
        yield Reading(rec.device, ts, {c: float(row[j]) for j, c in enumerate(rec.channels)})


def write_recording(
    path: str | Path,
    rows: Sequence[Reading],
    channels: Sequence[str],
    labels: Sequence[tuple[str, str, str]] | None = None,
) -> int:
    """Write readings in the simulator/export CSV format; returns rows written. `labels` gives each
    row's (machine_state, fault, sensor_fault); without it the label columns are empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    header = ["ts", "device", *channels, *LABEL_COLUMNS]
    blank = ("", "", "")
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for i, r in enumerate(rows):
            stamp = datetime.fromtimestamp(r.ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            vals = ["nan" if v != v else repr(v) for v in (r.values.get(c, float("nan")) for c in channels)]
            w.writerow([stamp, r.device, *vals, *(labels[i] if labels is not None else blank)])
    return len(rows)
