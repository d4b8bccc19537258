"""Replay recordings through the live pipeline: backtests, incident reproduction, threshold tuning.

Replay is just another source: readings from a file (or an agent's own database) go through the very
`Pipeline` object the live agent uses. Health checks and validation run on *data* time, so the same
recording gives the same alerts, with the same ids, on any machine.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent.recording import Recording, iter_readings, read_recording
from agent.types import Event, Judgement, Reading


@dataclass
class ReplayResult:
    """What a replay produced: every event, every judgement, and the input it saw."""

    events: list[Event] = field(default_factory=list)
    judgements: list[Judgement] = field(default_factory=list)
    recordings: list[Recording] = field(default_factory=list)
    readings: int = 0
    seconds: float = 0.0

    def alerts(self) -> list[dict[str, Any]]:
        return [e.payload for e in self.events if e.topic_kind == "alert"]

    def alert_spans(self) -> dict[str, list[tuple[str, float, float | None, float]]]:
        """Per device: (alert_id, opened_ts, resolved_ts or None, peak) from the final message of each alert."""
        last: dict[str, dict[str, Any]] = {}
        for p in self.alerts():
            last[p["alert_id"]] = p
        spans: dict[str, list[tuple[str, float, float | None, float]]] = {}
        for p in last.values():
            spans.setdefault(p["device"], []).append(
                (p["alert_id"], p["opened_ts"], p.get("resolved_ts"), p["peak"])
            )
        for v in spans.values():
            v.sort(key=lambda s: s[1])
        return spans


def load_inputs(paths: Sequence[str | Path], channels: Sequence[str] | None = None) -> list[Recording]:
    recs: list[Recording] = []
    for p in paths:
        recs.extend(read_recording(p, channels=channels))
    return recs


def paced(readings: Iterator[Reading], speed: float | None) -> Iterator[Reading]:
    """Yield readings at `speed` x data time (None = as fast as possible)."""
    if not speed:
        yield from readings
        return
    t0_wall = time.monotonic()
    t0_data: float | None = None
    for r in readings:
        if t0_data is None:
            t0_data = r.ts
        wait = (r.ts - t0_data) / speed - (time.monotonic() - t0_wall)
        if wait > 0:
            time.sleep(wait)
        yield r


class JsonLines:
    """Writes each event as one compact JSON line (the same payloads the uplink sends)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: Event) -> None:
        self.out.write(json.dumps(event.payload, separators=(",", ":"), allow_nan=False) + "\n")


def write_summary(result: ReplayResult, out: IO[str] = sys.stdout) -> None:
    spans = result.alert_spans()
    n_alerts = sum(len(v) for v in spans.values())
    health = [e for e in result.events if e.topic_kind == "health" and e.payload.get("state") == "raised"]
    rate = result.readings / result.seconds if result.seconds > 0 else float("inf")
    print(
        f"replayed {result.readings} readings from {len(result.recordings)} recording(s) in "
        f"{result.seconds:.1f} s ({rate:,.0f} readings/s): {len(result.judgements)} windows scored, "
        f"{n_alerts} alert(s), {len(health)} sensor-health event(s)",
        file=out,
    )
    for device, items in sorted(spans.items()):
        for alert_id, opened, resolved, peak in items:
            end = "open" if resolved is None else f"resolved after {resolved - opened:.0f} s"
            print(f"  {device}: alert {alert_id} at {_iso(opened)}, peak {peak:.3g}, {end}", file=out)


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
