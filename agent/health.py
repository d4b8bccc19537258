"""Sensor health: silent devices, stuck channels, bursts of out-of-range, NaN and garbage input.

Stage: Reading / Reject / clock tick -> health Events (raised / cleared). Sensor faults are reported
here as their own events and never reach the anomaly detector as fake machine anomalies.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from agent import metrics
from agent.types import Event, Reading, Reject


class HealthConfig(BaseModel):
    """[health] settings: when a sensor or a line is reported unhealthy, and when it is cleared."""

    model_config = ConfigDict(extra="forbid")

    silence_s: float = Field(
        30.0, gt=0.0, description="a known device with no reading for this long (gateway clock) is silent"
    )
    stuck_n: int = Field(
        30, ge=2, description="consecutive readings of one channel within stuck_eps of each other = stuck"
    )
    stuck_eps: float = Field(
        0.0, ge=0.0, description="max range (max - min) of a stuck run; 0 = exact equality"
    )
    reject_k: int = Field(
        5, ge=1, description="offending inputs (out_of_range, nan, garbage) within reject_window_s to raise"
    )
    reject_window_s: float = Field(60.0, gt=0.0, description="sliding window for counting offending inputs")
    clear_s: float = Field(
        60.0,
        gt=0.0,
        description="an out_of_range / nan / garbage event clears after this long without offences",
    )


# Reject reason codes (docs/protocol.md) -> health event kind. Other reasons (duplicate, out_of_order,
# future) are about timing, not about a sensor or a line, and are only counted by the parser's metric.
REJECT_KINDS: dict[str, str] = {
    "range": "out_of_range",
    "nan": "nan",
    **{reason: "garbage" for reason in ("encoding", "checksum", "syntax", "too_long", "version", "schema")},
}


def event_id(kind: str, source: str, channel: str | None, raised_ts: float) -> str:
    """Deterministic id of one episode, so a replay produces the same ids as the live run."""
    return hashlib.sha256(f"{kind}|{source}|{channel or ''}|{raised_ts:.3f}".encode()).hexdigest()[:16]


@dataclass
class _Episode:
    """One raised health event, until it is cleared."""

    event_id: str
    kind: str
    source: str  # device, or the origin (port / topic) when the device is unknown
    channel: str | None
    raised_ts: float
    count: int
    last_offence: float


@dataclass
class _Run:
    """The current run of near-identical values of one channel."""

    lo: float
    hi: float
    n: int


class HealthMonitor:
    """Raises each sensor-health problem once per episode and clears it once.

    - silent: a device seen before sends nothing for silence_s (checked by tick), cleared by its next reading;
    - stuck: stuck_n consecutive values of a channel within stuck_eps, cleared when the value moves;
    - out_of_range / nan / garbage: reject_k offending inputs within reject_window_s, cleared by tick
      after clear_s without a new one. Garbage without a device is attributed to its origin.
    """

    def __init__(self, config: HealthConfig, gateway_id: str) -> None:
        self.config = config
        self.gateway_id = gateway_id
        self._last_seen: dict[str, float] = {}
        self._runs: dict[str, dict[str, _Run]] = {}  # device -> channel -> its current run
        self._offences: dict[tuple[str, str], deque[float]] = {}
        self._open: dict[tuple[str, str | None, str], _Episode] = {}  # (source, channel, kind)
        # A lower bound of `next_due`, kept while only readings of known, non-silent devices arrive
        # (they only move their own silence deadline later); None = recompute.
        self._due: float | None = None

    def observe_reading(self, reading: Reading) -> list[Event]:
        """Track silence and stuck channels. Uses the gateway clock when known (device time in replay)."""
        now = reading.received if reading.received is not None else reading.ts
        device = reading.device
        events: list[Event] = []
        seen = self._last_seen.get(device)
        if seen is None or now < seen:  # a new device (or a clock step back) may move next_due earlier
            self._due = None
        self._last_seen[device] = now
        if self._open:
            silent = self._open.get((device, None, "silent"))
            if silent is not None:
                events.append(self._clear(silent, now, "readings resumed"))
        runs = self._runs.get(device)
        if runs is None:
            runs = self._runs[device] = {}
        eps = self.config.stuck_eps
        open_ = self._open
        for channel, value in reading.values.items():
            if not math.isfinite(value):
                continue  # a missing value neither extends nor breaks a run
            # Hot path (per channel per reading), `_observe_value` inlined: the value breaks the run
            # and no episode is open, so the run restarts in place and nothing is emitted.
            run = runs.get(channel)
            if run is not None and (not open_ or (device, channel, "stuck") not in open_):
                hi, lo = run.hi, run.lo
                # max(hi, value) - min(lo, value), without the two builtin calls
                if not (value if value > hi else hi) - (value if value < lo else lo) <= eps:
                    run.lo = run.hi = value
                    run.n = 1
                    continue
            events.extend(self._observe_value(device, channel, value, now))
        return events

    def observe_reject(self, reject: Reject, origin: str, now: float) -> list[Event]:
        """Count an offending input; raise when reject_k fall within reject_window_s."""
        events: list[Event] = []
        self._due = None
        if reject.device is not None and reject.device in self._last_seen:
            # a device that sends bad data is not silent: report the bad data, not a second problem
            self._last_seen[reject.device] = now
            silent = self._open.get((reject.device, None, "silent"))
            if silent is not None:
                events.append(self._clear(silent, now, f"input resumed (rejected: {reject.reason})"))
        kind = REJECT_KINDS.get(reject.reason)
        if kind is None:
            return events
        source = reject.device or origin
        window = self._offences.setdefault((source, kind), deque())
        window.append(now)
        while window and window[0] <= now - self.config.reject_window_s:
            window.popleft()
        episode = self._open.get((source, None, kind))
        if episode is not None:
            episode.count += 1
            episode.last_offence = now
            return events
        if len(window) < self.config.reject_k:
            return events
        detail = (
            f"{len(window)} {reject.reason} rejects within {self.config.reject_window_s:g} s"
            f" (last: {reject.detail})"
        )
        if source != reject.device:
            detail += f"; device unknown, reported by origin {origin}"
        events.append(self._raise(kind, source, None, now, len(window), detail))
        return events

    def tick(self, now: float) -> list[Event]:
        """Periodic checks on the gateway clock: silent devices, and reject episodes that went quiet."""
        events: list[Event] = []
        self._due = None
        for device, seen in self._last_seen.items():
            quiet = now - seen
            if quiet >= self.config.silence_s and (device, None, "silent") not in self._open:
                events.append(self._raise("silent", device, None, now, 0, f"no reading for {quiet:.1f} s"))
        for episode in list(self._open.values()):
            if episode.kind in REJECT_KINDS.values() and now - episode.last_offence >= self.config.clear_s:
                events.append(
                    self._clear(episode, now, f"no offending input for {now - episode.last_offence:.1f} s")
                )
        return events

    def next_due(self) -> float:
        """A time before which `tick` cannot emit or change anything (inf: nothing pending), so replay
        can skip the ticks of a long gap in the data. Conservative by 1 ms against float rounding.

        Cached between calls: a reading of a known device that is not silent only moves that device's
        deadline later, so the cached value stays a lower bound (a tick before the real due time
        emits nothing); anything else (new device, reject, tick, raise, clear) drops the cache."""
        if self._due is not None:
            return self._due
        due = math.inf
        for device, seen in self._last_seen.items():
            if (device, None, "silent") not in self._open:
                due = min(due, seen + self.config.silence_s)
        reject_kinds = REJECT_KINDS.values()
        for episode in self._open.values():
            if episode.kind in reject_kinds:
                due = min(due, episode.last_offence + self.config.clear_s)
        self._due = due - 1e-3
        return self._due

    def active(self) -> list[dict]:
        """Raised, not yet cleared events (for status and tests)."""
        return [
            {
                "event_id": e.event_id,
                "kind": e.kind,
                "device": e.source,
                "channel": e.channel,
                "count": e.count,
            }
            for e in self._open.values()
        ]

    # -- internals ----------------------------------------------------------------------------------
    def _observe_value(self, device: str, channel: str, value: float, now: float) -> list[Event]:
        runs = self._runs.setdefault(device, {})
        run = runs.get(channel)
        if run is not None and max(run.hi, value) - min(run.lo, value) <= self.config.stuck_eps:
            run.lo, run.hi, run.n = min(run.lo, value), max(run.hi, value), run.n + 1
            episode = self._open.get((device, channel, "stuck")) if self._open else None
            if episode is not None:
                episode.count = run.n
                return []
            if run.n >= self.config.stuck_n:
                detail = f"{run.n} consecutive readings at {value:g}"
                return [self._raise("stuck", device, channel, now, run.n, detail)]
            return []
        # Hot path (called per channel per reading): restart the run in place, and skip the episode
        # lookup while nothing is open.
        if run is None:
            runs[channel] = _Run(lo=value, hi=value, n=1)
        else:
            run.lo = run.hi = value
            run.n = 1
        if not self._open:
            return []
        episode = self._open.get((device, channel, "stuck"))
        if episode is None:
            return []
        return [self._clear(episode, now, f"value moved to {value:g} after {episode.count} readings")]

    def _raise(
        self, kind: str, source: str, channel: str | None, now: float, count: int, detail: str
    ) -> Event:
        episode = _Episode(
            event_id=event_id(kind, source, channel, now),
            kind=kind,
            source=source,
            channel=channel,
            raised_ts=now,
            count=count,
            last_offence=now,
        )
        self._open[(source, channel, kind)] = episode
        self._due = None
        return self._event(episode, "raised", 0, now, detail)

    def _clear(self, episode: _Episode, now: float, detail: str) -> Event:
        del self._open[(episode.source, episode.channel, episode.kind)]
        self._due = None
        if episode.kind != "silent" and episode.kind != "stuck":
            self._offences.pop((episode.source, episode.kind), None)
        return self._event(episode, "cleared", 1, now, detail)

    def _event(self, episode: _Episode, state: str, n: int, now: float, detail: str) -> Event:
        metrics.HEALTH_EVENTS.labels(episode.kind, state).inc()
        payload = {
            "v": 1,
            "type": "health",
            "msg_id": f"{episode.event_id}:{n}",
            "event_id": episode.event_id,
            "state": state,
            "gateway": self.gateway_id,
            "device": episode.source,
            "channel": episode.channel,
            "kind": episode.kind,
            "ts": now,
            "detail": detail,
            "count": episode.count,
        }
        return Event(topic_kind="health", device=episode.source, payload=payload)
