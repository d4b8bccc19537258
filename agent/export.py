"""`edgewatch export`: pull readings off a gateway's database in the recording format, for replay or
training elsewhere; with `--labels`, as a training set built from the analysts' verdicts.

How verdicts become row labels (docs/model.md, "Retraining on analysts' labels"): each alert spans
from the start of the window that opened it to its resolve (an open alert: to the last reading).
Rows in a `true_positive` span are a fault (machine_state `degrading`, fault `labelled_fault`),
rows in a `maintenance` span are `maintenance` (neither normal nor a fault), rows in an alert nobody
labelled are `unknown`, and everything else, the `false_positive` spans included, is `normal`.
Training uses only `normal` rows, so a labelled false positive becomes normal data for the next model
while an unlabelled alert is kept out of it (it may be a fault nobody looked at).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.recording import parse_time, stored_readings, write_recording
from agent.types import Reading

# (machine_state, fault) per verdict, by precedence when spans overlap (highest first)
_ROW_LABEL = {
    "true_positive": ("degrading", "labelled_fault"),
    "maintenance": ("maintenance", ""),
    None: ("unknown", ""),  # an alert nobody labelled
    "false_positive": ("normal", ""),
}
_PRECEDENCE = list(_ROW_LABEL)


@dataclass(frozen=True, slots=True)
class Span:
    """One alert's time span on one device and the verdict on it (None: not labelled)."""

    device: str
    start: float
    end: float
    label: str | None


def label_spans(db_path: str | Path) -> list[Span]:
    """Every alert of the database with its verdict, plus labelled alerts whose rows retention removed."""
    from agent.db import open_db

    db = open_db(db_path)
    try:
        rows = db.execute(
            "SELECT a.device, a.opened_ts, a.resolved_ts, l.label FROM alerts a "
            "LEFT JOIN labels l ON l.alert_id = a.alert_id "
            "UNION ALL SELECT l.device, l.opened_ts, l.resolved_ts, l.label FROM labels l "
            "WHERE l.alert_id NOT IN (SELECT alert_id FROM alerts)"
        ).fetchall()
        spans = []
        for device, opened, resolved, verdict in rows:
            # the alert opened at the end of an anomalous window: its span starts with that window
            first = db.execute(
                "SELECT min(start_ts) FROM scores WHERE device = ? AND end_ts = ?", [device, opened]
            ).fetchone()[0]
            start = float(first) if first is not None else float(opened)
            end = float(resolved) if resolved is not None else float("inf")
            spans.append(Span(device, start, end, verdict))
        return spans
    finally:
        db.conn.close()


def row_labels(rows: list[Reading], spans: list[Span]) -> list[tuple[str, str, str]]:
    """(machine_state, fault, sensor_fault) of each row under the spans' verdicts."""
    by_device: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_device.setdefault(r.device, []).append(i)
    rank = np.full(len(rows), len(_PRECEDENCE), dtype=np.int64)  # past the end: normal
    for device, idx in by_device.items():
        ts = np.array([rows[i].ts for i in idx])
        where = np.asarray(idx)
        for s in (s for s in spans if s.device == device):
            inside = where[(ts >= s.start) & (ts <= s.end)]
            rank[inside] = np.minimum(rank[inside], _PRECEDENCE.index(s.label))
    normal = ("normal", "", "")
    return [normal if k == len(_PRECEDENCE) else (*_ROW_LABEL[_PRECEDENCE[k]], "") for k in rank.tolist()]


def export_readings(
    db_path: str | Path,
    out: str | Path,
    devices: list[str] | None = None,
    since: float | None = None,
    until: float | None = None,
    with_labels: bool = False,
) -> int:
    """Write the readings of `devices` in [since, until) to `out`; returns the number of rows.
    `with_labels` fills the label columns from the analysts' verdicts (module docstring)."""
    rows = [r for per_device in stored_readings(db_path, devices, since, until).values() for r in per_device]
    rows.sort(key=lambda r: (r.ts, r.device))
    channels = sorted({c for r in rows for c in r.values})
    known = [c for c in ("temperature", "vibration", "pressure") if c in channels]
    channels = known + [c for c in channels if c not in known]
    labels = row_labels(rows, label_spans(db_path)) if with_labels else None
    return write_recording(out, rows, channels, labels)


def run_export_cli(args: Any) -> int:
    if not Path(args.db).is_file():
        print(f"edgewatch export: no database at {args.db}", file=sys.stderr)
        return 2
    n = export_readings(
        args.db, args.out, args.device, parse_time(args.since), parse_time(args.until), args.labels
    )
    print(f"exported {n} readings to {args.out}", file=sys.stderr)
    return 0 if n else 1
