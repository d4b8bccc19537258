"""Put irregular sensor samples on an even time grid, the form the model was trained on.

Used by both the live windower and offline training so that the two see the same grid. Short gaps
(at most `max_gap` seconds between the two real samples around a grid point) are bridged by linear
interpolation; longer ones become NaN rows, which break windows. Missing is never turned into 0.
"""

from __future__ import annotations

import numpy as np

# Tolerance (as a fraction of the period) when snapping the first/last grid point to the data range,
# so that float noise in `ts` (e.g. ms timestamps) does not drop a grid point that sits on a sample.
_SNAP = 1e-6
# A real sample closer than this to a grid point is taken as sitting on it (timestamps are ms).
_EXACT_S = 1e-6


def grid_for(ts_first: float, ts_last: float, period: float, origin: float = 0.0) -> np.ndarray:
    """Grid points `origin + k * period` inside [ts_first, ts_last] (float64 seconds)."""
    if not period > 0:
        raise ValueError(f"period must be > 0, got {period!r}")
    k0 = int(np.ceil((ts_first - origin) / period - _SNAP))
    k1 = int(np.floor((ts_last - origin) / period + _SNAP))
    if k1 < k0:
        return np.empty(0, dtype=np.float64)
    return origin + np.arange(k0, k1 + 1, dtype=np.float64) * period


def _interp_channel(ts: np.ndarray, col: np.ndarray, grid: np.ndarray, max_gap: float) -> np.ndarray:
    """One channel: interpolate across gaps of at most `max_gap` seconds, NaN elsewhere."""
    ok = np.isfinite(col)
    tv = ts[ok]
    vv = col[ok]
    out = np.full(grid.shape, np.nan, dtype=np.float64)
    if tv.size == 0 or grid.size == 0:
        return out
    tol = _EXACT_S
    left = np.searchsorted(tv, grid + tol, side="right") - 1  # last real sample at or before the point
    has_left = left >= 0
    li = np.maximum(left, 0)  # left <= size - 1 always (np.clip costs several us per call)
    ri = np.minimum(left + 1, tv.size - 1)  # left + 1 >= 0 always
    exact = has_left & (np.abs(tv[li] - grid) <= tol)
    has_right = left + 1 < tv.size
    bridged = has_left & has_right & ((tv[ri] - tv[li]) <= max_gap)
    use = exact | bridged
    if not use.any():
        return out
    out[exact] = vv[li[exact]]
    b = bridged & ~exact
    if b.any():
        t0, t1 = tv[li[b]], tv[ri[b]]
        v0, v1 = vv[li[b]], vv[ri[b]]
        span = t1 - t0
        # span > 0 here: equal timestamps would make the point "exact" on the left sample.
        w = np.where(span > 0, (grid[b] - t0) / np.where(span > 0, span, 1.0), 0.0)
        out[b] = v0 + w * (v1 - v0)
    return out


def _interp_finite(ts: np.ndarray, vals: np.ndarray, grid: np.ndarray, max_gap: float) -> np.ndarray:
    """`_interp_channel` of several channels at once, all of whose samples are finite.

    They share the sample times, so the neighbour search is done once for all of them; every element
    goes through the same float operations as in `_interp_channel`, so the result is bit-identical.
    """
    out = np.full((grid.size, vals.shape[1]), np.nan, dtype=np.float64)
    if ts.size == 0 or grid.size == 0:
        return out
    tol = _EXACT_S
    left = np.searchsorted(ts, grid + tol, side="right") - 1
    has_left = left >= 0
    li = np.maximum(left, 0)
    ri = np.minimum(left + 1, ts.size - 1)
    exact = has_left & (np.abs(ts[li] - grid) <= tol)
    has_right = left + 1 < ts.size
    bridged = has_left & has_right & ((ts[ri] - ts[li]) <= max_gap)
    out[exact] = vals[li[exact]]
    b = bridged & ~exact
    if b.any():
        t0, t1 = ts[li[b]], ts[ri[b]]
        v0, v1 = vals[li[b]], vals[ri[b]]
        span = t1 - t0
        w = np.where(span > 0, (grid[b] - t0) / np.where(span > 0, span, 1.0), 0.0)
        out[b] = v0 + w[:, None] * (v1 - v0)
    return out


def resample_to_grid(
    ts: np.ndarray, values: np.ndarray, period: float, max_gap: float, origin: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Resample samples (`ts` ascending seconds, `values` [n, channels], NaN = missing) onto a grid.

    Returns `(grid_ts [m], grid_values [m, channels])`. The grid is every `origin + k * period` within
    [ts[0], ts[-1]]. A channel at a grid point is linearly interpolated between its nearest real
    (finite) samples on either side when they are at most `max_gap` seconds apart, else NaN.
    """
    ts = np.asarray(ts, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim == 1:
        vals = vals[:, None]
    if ts.ndim != 1 or vals.ndim != 2 or vals.shape[0] != ts.shape[0]:
        raise ValueError(f"ts must be [n] and values [n, channels]; got {ts.shape} and {vals.shape}")
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap!r}")
    if ts.size == 0:
        return np.empty(0, dtype=np.float64), np.empty((0, vals.shape[1]), dtype=np.float64)
    if not np.all(np.isfinite(ts)):
        raise ValueError("ts contains NaN or inf")
    if np.any(np.diff(ts) < 0):
        raise ValueError("ts must be sorted ascending")
    grid = grid_for(float(ts[0]), float(ts[-1]), period, origin)
    out = np.empty((grid.size, vals.shape[1]), dtype=np.float64)
    finite = np.isfinite(vals).all(axis=0)
    if finite.all():  # the common case: one neighbour search for every channel
        out[:] = _interp_finite(ts, vals, grid, max_gap)
        return grid, out
    for c in range(vals.shape[1]):
        out[:, c] = _interp_channel(ts, vals[:, c], grid, max_gap)
    return grid, out


def valid_runs(grid_values: np.ndarray) -> list[tuple[int, int]]:
    """Half-open `(start, stop)` row ranges in which no channel is NaN (where windows may be cut)."""
    v = np.asarray(grid_values)
    if v.ndim == 1:
        v = v[:, None]
    good = np.all(np.isfinite(v), axis=1).astype(np.int8)
    if good.size == 0:
        return []
    edges = np.diff(np.concatenate(([0], good, [0])))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def window_starts(runs: list[tuple[int, int]], window: int, stride: int) -> np.ndarray:
    """Start rows of every full window (length `window`, every `stride` rows) inside the valid runs."""
    starts: list[np.ndarray] = []
    for a, b in runs:
        if b - a >= window:
            starts.append(np.arange(a, b - window + 1, stride))
    return np.concatenate(starts) if starts else np.empty(0, dtype=np.int64)
