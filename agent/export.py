"""`edgewatch export`: pull readings off a gateway's database in the recording format, for replay or
training elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from agent.recording import parse_time, stored_readings, write_recording


def export_readings(
    db_path: str | Path,
    out: str | Path,
    devices: list[str] | None = None,
    since: float | None = None,
    until: float | None = None,
) -> int:
    """Write the readings of `devices` in [since, until) to `out`; returns the number of rows."""
    rows = [r for per_device in stored_readings(db_path, devices, since, until).values() for r in per_device]
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
