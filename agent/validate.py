"""Validation: physical ranges, NaN, duplicates, ordering and clock sanity, per device.

Parsing says whether the bytes are a well-formed reading; validation says whether the reading is
plausible and new. A rejected reading is counted by reason and logged at a rate limit, and never
reaches the buffer or the model (a NaN never becomes 0). Parse rejects go through `note_reject`, so
every reject in the agent is counted and logged the same way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent import metrics
from agent.types import Reading, Reject

log = logging.getLogger(__name__)

DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (-40.0, 150.0),  # °C, bearing housing
    "vibration": (0.0, 100.0),  # mm/s RMS
    "pressure": (-1.0, 40.0),  # bar gauge
}


class ValidationConfig(BaseModel):
    """Which readings are plausible. Ranges are physical limits of the sensors, not alarm levels."""

    model_config = ConfigDict(extra="forbid")

    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Per-channel [min, max] physical range, merged over the defaults temperature = "
        "[-40, 150] °C, vibration = [0, 100] mm/s, pressure = [-1, 40] bar. Channels without a range "
        "pass the range check.",
    )
    max_future_s: float = Field(
        300.0,
        ge=0,
        description="Reject readings whose timestamp is more than this many seconds ahead of "
        "the gateway clock (a device with a wrong clock).",
    )
    required_channels: list[str] = Field(
        default_factory=list,
        description="Channels every reading must carry (rejected as 'schema' otherwise). Empty: none.",
    )
    log_interval_s: float = Field(
        10.0,
        gt=0,
        description="At most one log line per reject reason per this many seconds; the "
        "lines in between are counted and the count is logged with the next one.",
    )

    @field_validator("ranges")
    @classmethod
    def _ranges_ordered(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (lo, hi) in v.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"range of {name!r} must be [min, max] with finite min < max")
        return v

    def effective_ranges(self) -> dict[str, tuple[float, float]]:
        return {**DEFAULT_RANGES, **self.ranges}


class RateLimitedRejectLog:
    """Logs the first reject of each reason, then at most one line per interval with a suppressed count."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, rej: Reject) -> bool:
        """Log `rej` unless the rate limit says not now; return whether a line was written."""
        now = self._clock()
        last = self._last.get(rej.reason)
        if last is not None and now - last < self.interval_s:
            self._suppressed[rej.reason] = self._suppressed.get(rej.reason, 0) + 1
            return False
        self._last[rej.reason] = now
        n = self._suppressed.pop(rej.reason, 0)
        more = f" (+{n} more '{rej.reason}' rejects since the last line)" if n else ""
        log.warning("rejected (%s) from %s: %s%s", rej.reason, rej.device or "?", rej.detail, more)
        return True


@dataclass(slots=True)
class _Last:
    ts: float
    seq: int | None


class Validator:
    """Stateful per-device checks. Feed readings of all devices in arrival order through `check`."""

    def __init__(self, config: ValidationConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or ValidationConfig()
        self._ranges = self.config.effective_ranges()
        self._required = tuple(self.config.required_channels)
        self._last: dict[str, _Last] = {}
        self._log = RateLimitedRejectLog(self.config.log_interval_s, clock)
        self._accepted: dict[str, Any] = {}  # device -> its READINGS_IN child

    def restore(self, last_ts_by_device: dict[str, float]) -> None:
        """Resume after a restart: readings at or before what is already stored are not accepted again."""
        for device, ts in last_ts_by_device.items():
            cur = self._last.get(device)
            if cur is None or ts > cur.ts:
                self._last[device] = _Last(ts, None)

    def note_reject(self, rej: Reject) -> Reject:
        """Count and (rate-limited) log a reject from any stage; returns it for chaining."""
        metrics.READINGS_REJECTED.labels(rej.reason).inc()
        self._log(rej)
        return rej

    def _reject(self, reason: str, detail: str, reading: Reading) -> Reject:
        return self.note_reject(Reject(reason=reason, detail=detail, device=reading.device))

    def check(self, reading: Reading, now: float | None) -> Reading | Reject:
        """Accept (and remember) `reading`, or return why not.

        `now` is the gateway clock (epoch s); None (replay of a recording) skips the `future` check.
        """
        values = reading.values
        for ch in self._required:
            if ch not in values:
                return self._reject("schema", f"required channel {ch!r} missing", reading)
        if not math.isfinite(reading.ts):
            return self._reject("schema", f"timestamp {reading.ts} is not finite", reading)
        try:  # a finite sum means every value is finite: skip the per-channel test (the usual reading)
            all_finite = math.isfinite(sum(values.values()))
        except TypeError:
            all_finite = False
        if not all_finite:
            for ch, x in values.items():
                if not math.isfinite(x):
                    return self._reject("nan", f"{ch} is {x}", reading)
        for ch, x in values.items():
            r = self._ranges.get(ch)
            if r is not None and not r[0] <= x <= r[1]:
                return self._reject("range", f"{ch} = {x} outside [{r[0]}, {r[1]}]", reading)
        ahead = reading.ts - now if now is not None else 0.0
        if ahead > self.config.max_future_s:
            return self._reject("future", f"timestamp {ahead:.0f} s ahead of the gateway clock", reading)
        last = self._last.get(reading.device)
        if last is not None:
            same_seq = reading.seq is not None and reading.seq == last.seq
            rebooted_again = reading.seq == 0 and reading.ts > last.ts
            if reading.ts == last.ts or (same_seq and not rebooted_again):
                return self._reject(
                    "duplicate", f"seq {reading.seq} ts {reading.ts:.3f} already accepted", reading
                )
            if reading.ts < last.ts:
                return self._reject(
                    "out_of_order", f"ts {reading.ts:.3f} older than last accepted {last.ts:.3f}", reading
                )
            # seq may restart at 0 (firmware reboot) or wrap; the newer timestamp decides.
        if last is None:
            self._last[reading.device] = _Last(reading.ts, reading.seq)
        else:
            last.ts, last.seq = reading.ts, reading.seq
        counter = self._accepted.get(reading.device)
        if counter is None:  # labels() costs a lock and a dict build: look the child up once per device
            counter = self._accepted[reading.device] = metrics.READINGS_IN.labels(reading.device)
        counter.inc()
        return reading
