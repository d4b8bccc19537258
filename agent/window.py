"""Sliding windows on a global time grid, cut live from each device's stream of accepted readings.

Why a global grid: the model was trained on samples every `period` seconds, and windows must not
depend on when the agent happened to start. Grid points are the multiples of `period` (epoch
seconds); a window ends on every grid point whose index is a multiple of `stride`. The value of a grid
point depends only on the nearest real samples on either side (agent.resample), so replay of a
recording and the live agent, started or restarted anywhere, cut identical windows (a restart only
loses the windows whose history it did not see).

A grid point is "complete" once no future reading can change it: for each channel, a finite sample
at or after it has arrived, or the channel's last finite sample is more than `max_gap` s old (then the
point is NaN for good). Gaps longer than `max_gap` are never bridged; a window containing a NaN grid
point is not emitted. Each device keeps a short in-memory ring of recent readings; nothing is re-read
from SQLite.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.resample import _EXACT_S, grid_for, resample_to_grid
from agent.types import Reading, Window

_SNAP = 1e-6  # as in agent.resample: float noise in ms timestamps must not move a point off the grid
_EVICT_MARGIN_S = 1e-3
# A sample this close to a grid point (a fraction of agent.resample's 1e-6 s snap and exact-match
# tolerances) is "on the grid" for the fast path, where resampling is the identity.
_ON_GRID_S = 2e-7


class WindowConfig(BaseModel):
    """How live readings are put on the model's grid (window, stride and period come from the bundle)."""

    model_config = ConfigDict(extra="forbid")

    max_gap_s: float = Field(
        5.0,
        ge=0,
        description="Gaps between real samples up to this many seconds are linearly interpolated on "
        "the grid; a longer gap leaves NaN grid points, which no window may contain.",
    )


@dataclass(slots=True)
class _Device:
    ts: deque[float] = field(default_factory=deque)
    rows: deque[tuple[float, ...]] = field(default_factory=deque)
    last_finite: list[float | None] = field(default_factory=list)
    next_k: int | None = None  # smallest window-end grid index not yet evaluated (multiple of stride)
    # The newest run of samples finite in every channel (on or off the grid; any gap in the ring is
    # <= max_gap): its grid values, each computed once, when the sample after it arrives (`_extend_run`).
    # run_k0 = grid index of grid[0] (None: no run, the newest sample is not finite); run_k1 = index
    # of the last settled grid point; run_ts / run_row = the run's newest sample.
    grid: deque[tuple[float, ...]] = field(default_factory=deque)
    run_k0: int | None = None
    run_k1: int = 0
    run_ts: float = 0.0
    run_row: tuple[float, ...] = ()
    evicted_for: int | None = None  # next_k of the last eviction: until it moves, nothing more can go


class Windower:
    """Turns each device's accepted readings (in timestamp order) into model-ready Windows."""

    def __init__(
        self, channels: Sequence[str], window: int, stride: int, period: float, max_gap: float = 5.0
    ) -> None:
        if not channels:
            raise ValueError("at least one channel is needed")
        if window < 1 or stride < 1:
            raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
        if not (period > 0 and math.isfinite(period)):
            raise ValueError(f"period must be a positive number of seconds, got {period!r}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap!r}")
        self.channels = tuple(channels)
        self.window = window
        self.stride = stride
        self.period = float(period)
        self.max_gap = float(max_gap)
        self._devices: dict[str, _Device] = {}
        self._grid_ok = self.period >= 1e-3  # the run shortcut needs periods well above the ms stamps

    def devices(self) -> list[str]:
        return sorted(self._devices)

    def prime(self, readings: Iterable[Reading]) -> int:
        """Warm the rings from stored history (e.g. `Buffer.last_n` after a restart or a model swap)
        without emitting: those windows were scored before. Returns the windows skipped."""
        return sum(len(self.push(r)) for r in readings)

    def _k_floor(self, ts: float) -> int:
        return math.floor(ts / self.period + _SNAP)

    def push(self, reading: Reading) -> list[Window]:
        """Add one accepted reading; return the windows it completes (usually none or one)."""
        ts = float(reading.ts)
        if not math.isfinite(ts):
            return []
        get = reading.values.get
        nan = math.nan
        row = tuple([float(get(c, nan)) for c in self.channels])
        st = self._devices.get(reading.device)
        if st is None:
            st = self._devices[reading.device] = _Device(last_finite=[None] * len(self.channels))
        out: list[Window] = []
        if st.ts:
            prev = st.ts[-1]
            if ts <= prev:  # the validator drops these; never let one rewrite history
                return []
            if ts - prev > self.max_gap:
                # Nothing after the gap can bridge back to before it: settle what is pending, start over.
                out += self._emit(reading.device, st, self._k_floor(prev))
                st.ts.clear()
                st.rows.clear()
                st.last_finite = [None] * len(self.channels)
                st.run_k0 = st.evicted_for = None
        st.ts.append(ts)
        st.rows.append(row)
        period = self.period
        k_done = math.floor(ts / period + _SNAP)
        last_finite = st.last_finite
        if math.isfinite(sum(row)):  # a finite sum means every value is finite (the usual reading)
            for c in range(len(last_finite)):
                last_finite[c] = ts
            if self._grid_ok:
                self._extend_run(st, ts, row)
        else:
            st.run_k0 = None
            for c, x in enumerate(row):
                if math.isfinite(x):
                    last_finite[c] = ts
                    continue
                last = last_finite[c]
                if last is not None and ts - last < self.max_gap:
                    k_done = min(k_done, self._k_floor(last))  # a later sample may still bridge this channel
        next_k = st.next_k
        if next_k is not None and next_k > k_done:
            # What `_emit` does when no window end is due yet (most readings), without the call.
            first_possible = math.ceil(st.ts[0] / period - _SNAP) + self.window - 1
            if first_possible > next_k:
                st.next_k = -(-first_possible // self.stride) * self.stride
        else:
            out += self._emit(reading.device, st, k_done)
        self._evict(st)
        return out

    def _emit(self, device: str, st: _Device, k_done: int) -> list[Window]:
        """Evaluate every window end in [next_k, k_done] (on the stride) with the ring as it is."""
        if not st.ts:
            return []
        first_possible = math.ceil(st.ts[0] / self.period - _SNAP) + self.window - 1
        k = first_possible if st.next_k is None else max(st.next_k, first_possible)
        k = -(-k // self.stride) * self.stride
        if k > k_done:
            st.next_k = k
            return []
        out: list[Window] = []
        run_k0 = st.run_k0
        first_lo = k - self.window + 1
        run_k0 = st.run_k0
        if run_k0 is not None and run_k0 <= first_lo and k_done <= st.run_k1:
            # Every window due lies in the newest on-grid run: cut it from the run's grid values.
            self._emit_from_run(device, st, k, k_done, out)
            st.next_k = (k_done // self.stride + 1) * self.stride
            return out
        grid, vals = self._on_grid(st)
        if grid.size:
            k0 = round(grid[0] / self.period)
            for kk in range(k, k_done + 1, self.stride):
                lo, hi = kk - self.window + 1 - k0, kk - k0 + 1
                if lo < 0 or hi > grid.size:
                    continue
                block = vals[lo:hi]
                if np.isfinite(block).all():
                    out.append(
                        Window(
                            device, float(grid[lo]), float(grid[hi - 1]), block.astype(np.float32, copy=True)
                        )
                    )
        st.next_k = (k_done // self.stride + 1) * self.stride
        return out

    def _extend_run(self, st: _Device, ts: float, row: tuple[float, ...]) -> None:
        """Add a finite sample to the newest run and compute the grid points it settles (or start a run).

        Exactly what `agent.resample` gives these grid points, computed once each instead of once per
        window: a point's left neighbour is the last sample at or before it (+ the resampler's 1e-6 s
        tolerance); within that tolerance the point takes the sample's values ("exact"), otherwise it
        is interpolated between its two neighbours with the same float operations (their gap is
        <= max_gap, or `push` would have cleared the ring). A point after the newest sample waits for
        the next one. Every sample of a run is finite in every channel, so the resampler's
        per-channel neighbour search finds the same neighbours for all channels.
        """
        period, tol, grid = self.period, _EXACT_S, st.grid
        if st.run_k0 is None:  # the first grid point whose left neighbour is this sample
            k = math.ceil((ts - tol) / period)
            while k * period + tol < ts:
                k += 1
            while (k - 1) * period + tol >= ts:
                k -= 1
            grid.clear()
            st.run_k0 = k
            t0, v0 = ts, row  # no earlier sample in the run: only exact points can be settled
        else:
            k = st.run_k1 + 1
            t0, v0 = st.run_ts, st.run_row
        span = ts - t0
        while True:
            g = k * period
            if ts <= g + tol:  # the new sample is the point's left neighbour
                if abs(ts - g) <= tol:
                    grid.append(row)
                    k += 1
                    continue
                break  # after the newest sample: settled by the next one
            w = (g - t0) / span  # between the previous sample and this one (span > 0)
            grid.append(tuple([a + w * (b - a) for a, b in zip(v0, row, strict=True)]))
            k += 1
        st.run_k1, st.run_ts, st.run_row = k - 1, ts, row

    def _emit_from_run(self, device: str, st: _Device, k: int, k_done: int, out: list[Window]) -> None:
        """Windows ending at k..k_done (on the stride), sliced from the run's grid values: no
        arrays of the whole ring and no interpolation per window."""
        period, window, grid, k0 = self.period, self.window, st.grid, st.run_k0
        assert k0 is not None
        for kk in range(k, k_done + 1, self.stride):
            lo = kk - window + 1
            block = np.array(list(islice(grid, lo - k0, kk - k0 + 1)), dtype=np.float64)
            out.append(Window(device, lo * period, kk * period, block.astype(np.float32)))

    def _on_grid(self, st: _Device) -> tuple[np.ndarray, np.ndarray]:
        """`resample_to_grid` of the ring, skipping the interpolation in the common case where it is
        the identity: every sample finite and sitting on consecutive grid points (then each grid
        point is "exact" on its own sample and resample returns the samples unchanged)."""
        ts = np.fromiter(st.ts, dtype=np.float64, count=len(st.ts))
        rows = np.array(st.rows, dtype=np.float64)
        k = np.rint(ts / self.period)
        grid = k * self.period
        if (
            self.period >= 1e-3
            and np.all(np.diff(k) == 1)
            and np.abs(ts - grid).max() <= _ON_GRID_S * min(1.0, self.period)
            and np.isfinite(rows).all()
        ):
            return grid_for(float(ts[0]), float(ts[-1]), self.period), rows
        return resample_to_grid(ts, rows, self.period, self.max_gap)

    def _evict(self, st: _Device) -> None:
        """Drop samples that can no longer affect any future window (older than its left edge - max_gap)."""
        if st.next_k is None or st.next_k == st.evicted_for:
            # None is not reached (every push evaluates and sets next_k). An unchanged next_k means
            # an unchanged cut-off, which the ring's oldest sample and each last_finite already pass.
            return
        st.evicted_for = st.next_k
        if st.run_k0 is not None:  # grid points left of every future window's left edge
            lo_keep = st.next_k - self.window + 1
            while st.grid and st.run_k0 < lo_keep:
                st.grid.popleft()
                st.run_k0 += 1
        keep_from = (st.next_k - self.window + 1) * self.period - self.max_gap - _EVICT_MARGIN_S
        while st.ts and st.ts[0] < keep_from:
            st.ts.popleft()
            st.rows.popleft()
        for c, last in enumerate(st.last_finite):
            if last is not None and last < keep_from:
                st.last_finite[c] = None
