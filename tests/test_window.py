"""Windower: grid placement, interpolation, gaps, stride alignment, and live == offline == restarted."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.resample import resample_to_grid
from agent.types import Reading, Window
from agent.window import WindowConfig, Windower, _Device

CH = ("temperature", "vibration", "pressure")
T0 = 1_764_806_400.0  # a multiple of every period used here


def rd(ts: float, device: str = "pump-01", **values: float) -> Reading:
    return Reading(device, ts, values)


def lin(ts: float) -> dict[str, float]:
    """Linear signals: interpolation must reproduce them exactly (up to float rounding)."""
    t = ts - T0
    return {"temperature": 40 + 0.5 * t, "vibration": 2 - 0.01 * t, "pressure": 3 + 0.1 * t}


def feed(w: Windower, readings: list[Reading]) -> list[Window]:
    out: list[Window] = []
    for r in readings:
        out += w.push(r)
    return out


def key(win: Window) -> tuple:
    return (win.device, win.start_ts, win.end_ts, win.data.tobytes())


def test_on_grid_samples_become_windows_on_the_stride() -> None:
    w = Windower(CH, window=4, stride=2, period=1.0, max_gap=5.0)
    out = feed(w, [rd(T0 + i, **lin(T0 + i)) for i in range(10)])
    assert [win.end_ts - T0 for win in out] == [4.0, 6.0, 8.0]  # T0+3 is odd; T0+4 is first with 4 points
    first = out[0]
    assert first.start_ts == T0 + 1 and first.data.shape == (4, 3) and first.data.dtype == np.float32
    expected = np.array([[lin(T0 + i)[c] for c in CH] for i in range(1, 5)], dtype=np.float32)
    np.testing.assert_array_equal(first.data, expected)
    assert w.devices() == ["pump-01"]


def test_window_is_emitted_as_soon_as_its_last_point_completes() -> None:
    w = Windower(CH, window=3, stride=1, period=1.0, max_gap=5.0)
    assert feed(w, [rd(T0 + i, **lin(T0 + i)) for i in range(2)]) == []
    out = w.push(rd(T0 + 2.0, **lin(T0 + 2.0)))  # the sample sitting on the grid point completes it
    assert [x.end_ts for x in out] == [T0 + 2]


def test_off_grid_samples_are_interpolated() -> None:
    w = Windower(CH, window=5, stride=5, period=1.0, max_gap=5.0)
    ts = [T0 + 0.3 + 0.7 * i for i in range(30)]
    out = feed(w, [rd(t, **lin(t)) for t in ts])
    assert out
    for win in out:
        grid = np.arange(win.start_ts, win.end_ts + 0.5, 1.0)
        want = np.array([[lin(g)[c] for c in CH] for g in grid], dtype=np.float32)
        np.testing.assert_allclose(win.data, want, rtol=1e-6)
        assert round(win.end_ts) % 5 == 0


def test_sub_second_period_keeps_ms_timestamps_on_the_grid() -> None:
    w = Windower(CH, window=10, stride=10, period=0.1, max_gap=1.0)
    out = feed(w, [rd(round(T0 + 0.1 * i, 3), **lin(T0 + 0.1 * i)) for i in range(45)])
    assert len(out) == 4  # ends at indices 9, 19, 29, 39 relative to T0
    assert all(abs(x.end_ts / 0.1 - round(x.end_ts / 0.1)) < 1e-6 for x in out)


def test_short_gap_bridged_long_gap_breaks() -> None:
    short = [T0 + i for i in range(20) if not 8 <= i <= 11]  # 5 s between samples: bridged
    long_ = [T0 + i for i in range(30) if not 8 <= i <= 14]  # 8 s: never bridged
    ws = feed(Windower(CH, 4, 1, 1.0, max_gap=5.0), [rd(t, **lin(t)) for t in short])
    assert [x.end_ts - T0 for x in ws] == [float(k) for k in range(3, 20)]
    wl = feed(Windower(CH, 4, 1, 1.0, max_gap=5.0), [rd(t, **lin(t)) for t in long_])
    ends = [x.end_ts - T0 for x in wl]
    assert ends == [3.0, 4.0, 5.0, 6.0, 7.0, *[float(k) for k in range(18, 30)]]


def test_missing_channel_is_nan_never_zero() -> None:
    w = Windower(CH, window=3, stride=1, period=1.0, max_gap=1.5)
    readings = [rd(T0 + i, **lin(T0 + i)) for i in range(12)]
    for i in range(4, 9):  # pressure absent for 5 s > max_gap: those points are NaN
        readings[i] = rd(T0 + i, temperature=1.0, vibration=1.0)
    out = feed(w, readings)
    ends = [x.end_ts - T0 for x in out]
    assert ends == [2.0, 3.0, 11.0]
    for x in out:
        assert not (x.data == 0).any()


def test_single_missing_channel_is_interpolated_once_the_next_sample_arrives() -> None:
    w = Windower(CH, window=3, stride=1, period=1.0, max_gap=5.0)
    feed(w, [rd(T0 + i, **lin(T0 + i)) for i in range(3)])
    assert (
        w.push(rd(T0 + 3, temperature=lin(T0 + 3)["temperature"], vibration=lin(T0 + 3)["vibration"])) == []
    )
    out = w.push(rd(T0 + 4, **lin(T0 + 4)))  # settles point 3 (pressure bridged) and point 4
    assert [x.end_ts - T0 for x in out] == [3.0, 4.0]
    assert out[0].data[-1, 2] == pytest.approx(lin(T0 + 3)["pressure"])


def test_out_of_order_or_equal_timestamps_are_ignored() -> None:
    w = Windower(CH, 2, 1, 1.0)
    feed(w, [rd(T0 + i, **lin(T0 + i)) for i in range(5)])
    assert w.push(rd(T0 + 2, temperature=99, vibration=99, pressure=99)) == []
    assert w.push(rd(T0 + 4, temperature=99, vibration=99, pressure=99)) == []
    out = w.push(rd(T0 + 5, **lin(T0 + 5)))
    assert 99 not in out[0].data


def test_devices_do_not_mix() -> None:
    w = Windower(CH, 3, 1, 1.0)
    mixed: list[Reading] = []
    for i in range(10):
        mixed.append(rd(T0 + i, "a", **lin(T0 + i)))
        mixed.append(rd(T0 + i + 0.5, "b", temperature=1.0, vibration=2.0, pressure=3.0))
    out = feed(w, mixed)
    a_only = feed(Windower(CH, 3, 1, 1.0), [r for r in mixed if r.device == "a"])
    assert [key(x) for x in out if x.device == "a"] == [key(x) for x in a_only]
    assert all((x.data == np.float32([1, 2, 3])).all() for x in out if x.device == "b")


def test_ring_stays_small() -> None:
    w = Windower(CH, 16, 4, 1.0, 5.0)
    feed(w, [rd(T0 + 0.5 * i, **lin(T0 + 0.5 * i)) for i in range(2000)])
    assert len(w._devices["pump-01"].ts) <= 2 * (16 + 4 + 5) + 4


def test_prime_from_history_then_continue_like_an_uninterrupted_run() -> None:
    readings = [rd(T0 + i, **lin(T0 + i)) for i in range(60)]
    full = [key(x) for x in feed(Windower(CH, 16, 4, 1.0), readings)]
    restarted = Windower(CH, 16, 4, 1.0)
    skipped = restarted.prime(readings[20:40])  # what Buffer.last_n would give back after a restart
    assert skipped == 1  # 16 points from 20 end at 35 at the earliest; the stride allows 36 (40 not yet seen)
    after = [key(x) for x in feed(restarted, readings[40:])]
    assert after == [k for k in full if k[2] > T0 + 39]
    assert after  # the restart did not lose the windows right after it


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Windower(CH, 0, 1, 1.0)
    with pytest.raises(ValueError):
        Windower(CH, 4, 1, 0.0)
    with pytest.raises(ValueError):
        Windower((), 4, 1, 1.0)
    assert WindowConfig().max_gap_s == 5.0


# --- replay == live == restarted: the offline reference is resample_to_grid over the whole series ----


def offline_windows(readings: list[Reading], window: int, stride: int, period: float, max_gap: float) -> list:
    ts = np.array([r.ts for r in readings])
    vals = np.array([[r.values.get(c, math.nan) for c in CH] for r in readings])
    grid, gv = resample_to_grid(ts, vals, period, max_gap)
    out = []
    for i in range(window - 1, grid.size):
        k = round(grid[i] / period)
        block = gv[i - window + 1 : i + 1]
        if k % stride == 0 and np.isfinite(block).all():
            out.append(
                ("pump-01", float(grid[i - window + 1]), float(grid[i]), block.astype(np.float32).tobytes())
            )
    return out


@st.composite
def streams(draw: st.DrawFn) -> list[Reading]:
    n = draw(st.integers(20, 160))
    t = T0 + draw(st.integers(0, 5000)) / 1000
    out = []
    for _ in range(n):
        big = draw(st.integers(0, 30)) == 0
        t += draw(st.integers(6000, 40000) if big else st.integers(150, 1600)) / 1000
        t = round(t, 3)
        vals = {}
        for c in CH:
            if draw(st.integers(0, 19)) > 0:
                vals[c] = draw(st.floats(-50, 50, allow_nan=False))
        out.append(rd(t, **vals))
    return out


@settings(max_examples=60, deadline=None)
@given(streams(), st.integers(2, 10), st.integers(1, 6), st.sampled_from([0.5, 1.0, 2.0]), st.data())
def test_live_equals_offline_and_restart_is_a_consistent_subset(
    readings: list[Reading], window: int, stride: int, period: float, data: st.DataObject
) -> None:
    max_gap = 5.0
    live = [key(x) for x in feed(Windower(CH, window, stride, period, max_gap), readings)]
    ref = offline_windows(readings, window, stride, period, max_gap)
    last = readings[-1].ts
    assert set(live) <= set(ref)
    assert len(set(live)) == len(live)
    assert live == sorted(live, key=lambda k: k[2])
    # everything the offline run finds that no later reading could change, the live run emitted
    assert [k for k in ref if k[2] <= last - max_gap] == [k for k in live if k[2] <= last - max_gap]

    j = data.draw(st.integers(0, len(readings) - 1))
    restarted = [key(x) for x in feed(Windower(CH, window, stride, period, max_gap), readings[j:])]
    assert set(restarted) <= set(live) | set(ref)
    t_j = readings[j].ts
    settled = [k for k in ref if k[1] >= t_j + max_gap + 1e-3 and k[2] <= last - max_gap]
    assert settled == [k for k in restarted if k[1] >= t_j + max_gap + 1e-3 and k[2] <= last - max_gap]


class _EveryPushEvaluates(Windower):
    """The windower as it was before the per-reading shortcuts in `push`: `_emit` on every reading and
    the per-channel finiteness loop. The shortcuts must not change a window or the ring."""

    def push(self, reading: Reading) -> list[Window]:
        ts = float(reading.ts)
        if not math.isfinite(ts):
            return []
        row = tuple(float(reading.values.get(c, math.nan)) for c in self.channels)
        st = self._devices.get(reading.device)
        if st is None:
            st = self._devices[reading.device] = _Device(last_finite=[None] * len(self.channels))
        out: list[Window] = []
        if st.ts:
            prev = st.ts[-1]
            if ts <= prev:
                return []
            if ts - prev > self.max_gap:
                out += self._emit(reading.device, st, self._k_floor(prev))
                st.ts.clear()
                st.rows.clear()
                st.last_finite = [None] * len(self.channels)
        st.ts.append(ts)
        st.rows.append(row)
        k_done = self._k_floor(ts)
        for c, x in enumerate(row):
            if math.isfinite(x):
                st.last_finite[c] = ts
                continue
            last = st.last_finite[c]
            if last is not None and ts - last < self.max_gap:
                k_done = min(k_done, self._k_floor(last))
        out += self._emit(reading.device, st, k_done)
        self._evict(st)
        return out


@pytest.mark.parametrize("seed", range(6))
def test_push_shortcuts_change_no_window_and_no_ring(seed: int) -> None:
    rng = np.random.default_rng(seed)
    period = float(rng.choice([0.5, 1.0]))
    window, stride = int(rng.choice([4, 16, 64])), int(rng.choice([1, 3, 8]))
    max_gap = float(rng.choice([0.0, 2.0, 5.0]))
    fast, ref = (cls(CH, window, stride, period, max_gap) for cls in (Windower, _EveryPushEvaluates))
    ts = {d: T0 + rng.uniform(0, 3) for d in ("a", "b")}
    for _ in range(3000):
        d = str(rng.choice(["a", "b"]))
        ts[d] += float(rng.choice([period, period, period, 0.7 * period, 2 * period, 9 * period]))
        vals = {c: float(rng.normal(10, 3)) for c in CH if rng.random() > 0.03}
        if rng.random() < 0.03:
            vals["vibration"] = math.nan
        r = Reading(d, round(ts[d], 3), vals)
        assert [key(w) for w in fast.push(r)] == [key(w) for w in ref.push(r)]
    for d in ("a", "b"):
        a, b = fast._devices[d], ref._devices[d]
        assert (list(a.ts), list(a.rows), a.last_finite, a.next_k) == (
            list(b.ts),
            list(b.rows),
            b.last_finite,
            b.next_k,
        )
