"""`edgewatch export`: pull readings off a gateway's database in the recording format, for replay or
training elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from agent.buffer import Buffer, BufferConfig
from agent.db import open_db
from agent.recording import write_recording
from agent.replay import parse_time
from agent.types import Reading


def export_readings(
    db_path: str | Path,
    out: str | Path,
    devices: list[str] | None = None,
    since: float | None = None,
    until: float | None = None,
) -> int:
    """Write the readings of `devices` in [since, until] to `out`; returns the number of rows."""
    db = open_db(db_path)
    try:
        buf = Buffer(db, BufferConfig())
        rows: list[Reading] = []
        for device in devices or buf.devices():
            rows += buf.readings_between(
                device, float("-inf") if since is None else since, float("inf") if until is None else until
            )
    finally:
        db.conn.close()
    rows.sort(key=lambda r: (r.ts, r.device))
    channels = sorted({c for r in rows for c in r.values})
    known = [c for c in ("temperature", "vibration", "pressure") if c in channels]
    channels = known + [c for c in channels if c not in known]
    return write_recording(out, rows, channels)


def run_export_cli(args: Any) -> int:
    if not Path(args.db).is_file():
        print(f"edgewatch export: no database at {args.db}", file=sys.stderr)
        return 2
    n = export_readings(args.db, args.out, args.device, parse_time(args.since), parse_time(args.until))
    print(f"exported {n} readings to {args.out}", file=sys.stderr)
    return 0 if n else 1
