"""resample_to_grid: short gaps bridged, long gaps become NaN breaks, missing never becomes 0."""

from __future__ import annotations

import numpy as np
import pytest

from agent.resample import _interp_channel, resample_to_grid, valid_runs, window_starts


def test_regular_samples_on_grid_are_kept_exactly() -> None:
    ts = np.array([10.0, 11.0, 12.0, 13.0])
    v = np.array([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [4.0, 8.0]])
    g, out = resample_to_grid(ts, v, period=1.0, max_gap=2.5)
    np.testing.assert_array_equal(g, ts)
    np.testing.assert_array_equal(out, v)


def test_jittered_samples_are_interpolated_linearly() -> None:
    ts = np.array([0.2, 1.2, 2.2])
    v = np.array([[0.0], [10.0], [20.0]])
    g, out = resample_to_grid(ts, v, period=1.0, max_gap=1.5)
    np.testing.assert_array_equal(g, [1.0, 2.0])
    np.testing.assert_allclose(out[:, 0], [8.0, 18.0])


def test_gap_within_limit_is_bridged_and_longer_gap_is_nan() -> None:
    ts = np.array([0.0, 1.0, 4.0, 5.0, 15.0, 16.0])  # gap of 3 s, then of 10 s
    v = np.array([[0.0], [1.0], [4.0], [5.0], [15.0], [16.0]])
    g, out = resample_to_grid(ts, v, period=1.0, max_gap=3.0)
    assert g[0] == 0.0 and g[-1] == 16.0 and g.size == 17
    np.testing.assert_allclose(out[:6, 0], [0, 1, 2, 3, 4, 5])  # 2, 3 interpolated over the 3 s gap
    assert np.all(np.isnan(out[6:15, 0]))  # the 10 s gap is a break
    np.testing.assert_allclose(out[15:, 0], [15, 16])
    assert np.count_nonzero(out == 0.0) == 1  # the only 0 is the real first sample
    assert valid_runs(out) == [(0, 6), (15, 17)]


def test_nan_samples_count_as_missing_per_channel_never_zero() -> None:
    ts = np.arange(8, dtype=float)
    v = np.column_stack([np.arange(8, dtype=float) + 1, np.full(8, 7.0)])
    v[2:6, 0] = np.nan  # channel 0 missing for 4 samples: real neighbours 1 and 6 are 5 s apart
    v[3, 1] = np.nan  # channel 1 missing once: neighbours 2 s apart
    _, out = resample_to_grid(ts, v, period=1.0, max_gap=2.0)
    assert np.all(np.isnan(out[2:6, 0]))
    assert not np.any(out[:, 0] == 0.0)
    np.testing.assert_allclose(out[:, 1], 7.0)
    assert valid_runs(out) == [(0, 2), (6, 8)]


def test_origin_and_period_define_the_grid() -> None:
    ts = np.array([100.3, 102.9])
    v = np.array([[1.0], [3.6]])
    g, out = resample_to_grid(ts, v, period=0.5, max_gap=5.0, origin=0.25)
    np.testing.assert_allclose(g, [100.75, 101.25, 101.75, 102.25, 102.75])
    np.testing.assert_allclose(out[:, 0], 1.0 + (g - 100.3))


def test_epoch_timestamps_with_ms_noise() -> None:
    t0 = 1_764_806_400.0
    ts = t0 + np.arange(5) + np.array([0.0, 0.001, -0.002, 0.0, 0.003])
    v = np.arange(5, dtype=float)[:, None]
    g, out = resample_to_grid(ts, v, period=1.0, max_gap=2.0)
    assert g.size == 5 and g[0] == t0 and g[-1] == t0 + 4  # the last sample is 3 ms past the last point
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, 0], np.arange(5), atol=0.01)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="sorted"):
        resample_to_grid(np.array([2.0, 1.0]), np.ones((2, 1)), 1.0, 2.0)
    with pytest.raises(ValueError, match="period"):
        resample_to_grid(np.array([1.0, 2.0]), np.ones((2, 1)), 0.0, 2.0)
    g, out = resample_to_grid(np.empty(0), np.empty((0, 3)), 1.0, 2.0)
    assert g.size == 0 and out.shape == (0, 3)


def test_window_starts_stay_inside_runs() -> None:
    starts = window_starts([(0, 10), (20, 23), (30, 50)], window=5, stride=3)
    np.testing.assert_array_equal(starts, [0, 3, 30, 33, 36, 39, 42, 45])


@pytest.mark.parametrize("max_gap", [0.0, 2.0, 5.0])
def test_all_finite_channels_resampled_together_equal_one_channel_at_a_time(max_gap: float) -> None:
    """The shared neighbour search for all-finite channels is bit-identical to `_interp_channel`:
    on grid, jittered, sub-period, duplicate-ish and gapped sample times."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 90))
        period = float(rng.choice([0.1, 0.5, 1.0, 2.0]))
        steps = rng.choice([period, 0.5 * period, 1.5 * period, 3 * period, 7 * period, 1e-7], size=n)
        ts = np.sort(1_764_806_400.0 + np.cumsum(steps * (1 + rng.normal(0, 0.01, size=n))))
        if rng.random() < 0.5:
            ts = np.round(ts, 3)  # ms timestamps
        vals = rng.normal(0, 10, size=(n, int(rng.integers(1, 9))))
        grid, out = resample_to_grid(ts, vals, period, max_gap)
        for c in range(vals.shape[1]):
            ref = _interp_channel(ts, vals[:, c], grid, max_gap)
            assert out[:, c].tobytes() == ref.tobytes()
