"""Simulator physics: normal behaviour is plausible and each machine fault leaves its signature.

Fault scenarios draw exactly the same random numbers as `normal`, so each fault is compared with the
same device under `normal` sample by sample: the difference is the fault's effect alone.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from firmware_sim.pump import (
    BLOCK,
    FAULTS,
    MACHINE_STATES,
    PumpSim,
    device_params,
    first_order_lag,
    simulate,
)
from firmware_sim.scenario import MACHINE_FAULTS, build_scenario

START = 1_764_547_200_000  # 2025-12-01T00:00:00Z
H = 3600.0
HOURS = 8
ONSET, DEG = 1 * H, 5 * H  # degrading 1 h .. 6 h, failed after


def run(scenario: str, seed: int = 7, device: int = 0, hours: float = HOURS):
    sc = build_scenario(scenario, devices=2, horizon=hours * H, fault_after=ONSET, degradation=DEG, seed=seed)
    return simulate(seed, device, sc, START, hours * H)


@pytest.fixture(scope="module")
def normal():
    return run("normal")


@pytest.fixture(scope="module")
def faulty():
    return {kind: run(kind) for kind in MACHINE_FAULTS}


def hours_mask(c, a: float, b: float) -> np.ndarray:
    t = (c.ts_ms - START) / 1000.0
    return (t >= a * H) & (t < b * H)


def running(c) -> np.ndarray:
    """Samples where the pump is clearly running (pressure well above suction)."""
    return c.pressure > 2.0


def test_first_order_lag_matches_recursion() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=5000)
    for alpha in (0.5, 0.99, 0.9999):
        y, last = first_order_lag(u, alpha, 3.0)
        ref = np.empty_like(u)
        prev = 3.0
        for i, x in enumerate(u):
            prev = alpha * prev + (1 - alpha) * x
            ref[i] = prev
        np.testing.assert_allclose(y, ref, rtol=1e-7, atol=1e-9)
        assert last == pytest.approx(ref[-1])


def test_normal_operation_is_plausible_and_not_trivial(normal) -> None:
    run_ = running(normal)
    assert 0.6 < run_.mean() < 0.99  # duty cycle: mostly running, with stops
    p = normal.pressure[run_]
    assert 2.5 < np.median(p) < 5.5
    v = normal.vibration[run_]
    assert np.percentile(v, 5) > 0.8 and np.percentile(v, 95) < 3.5  # ISO 10816 "good" zone
    assert np.all((normal.temperature > 5) & (normal.temperature < 70))
    # Pressure and vibration both follow load: correlated while running.
    assert np.corrcoef(normal.pressure[run_], normal.vibration[run_])[0, 1] > 0.3
    # Load changes: several distinct pressure levels within a day's part.
    assert np.std(p) > 0.15
    # Thermal inertia: temperature changes slowly even when the pump starts or stops.
    assert np.max(np.abs(np.diff(normal.temperature))) < 1.0
    assert (
        np.all(normal.machine_state == 0) and np.all(normal.fault == 0) and np.all(normal.sensor_fault == 0)
    )


def test_ambient_daily_cycle_shows_in_stopped_temperature() -> None:
    """Over two days the afternoon is warmer than the early morning for the same device."""
    c = run("normal", hours=48)
    hour = ((c.ts_ms // 1000) % 86400) / 3600
    afternoon = c.temperature[(hour >= 13) & (hour < 17)]
    night = c.temperature[(hour >= 2) & (hour < 6)]
    assert afternoon.mean() > night.mean() + 1.0


def test_devices_and_seeds_have_their_own_parameters() -> None:
    assert device_params(1, 0) != device_params(1, 1)
    assert device_params(1, 0) != device_params(2, 0)
    assert device_params(1, 0) == device_params(1, 0)
    a, b = run("normal", seed=1, device=0, hours=2), run("normal", seed=1, device=1, hours=2)
    assert abs(np.nanmean(a.temperature) - np.nanmean(b.temperature)) > 0.5 or not np.allclose(
        a.pressure, b.pressure
    )


def test_chunking_does_not_change_values() -> None:
    """A long simulation's prefix equals a short one: values do not depend on the requested range."""
    sc = build_scenario("mixed", devices=2, horizon=6 * H, seed=3)
    short = simulate(3, 1, sc, START, BLOCK * 1.5)
    long = simulate(3, 1, sc, START, 3 * H)
    for f in (
        "ts_ms",
        "temperature",
        "vibration",
        "pressure",
        "machine_state",
        "fault",
        "sensor_fault",
        "wire",
    ):
        np.testing.assert_array_equal(getattr(short, f), getattr(long, f)[: len(short)])


@pytest.mark.parametrize("kind", MACHINE_FAULTS)
def test_fault_labels_and_no_effect_before_onset(kind, normal, faulty) -> None:
    c = faulty[kind]
    before, degr, failed = hours_mask(c, 0, 1), hours_mask(c, 1, 6), hours_mask(c, 6, HOURS)
    assert np.all(c.machine_state[before] == MACHINE_STATES.index("normal"))
    assert np.all(c.machine_state[degr] == MACHINE_STATES.index("degrading"))
    assert np.all(c.machine_state[failed] == MACHINE_STATES.index("failed"))
    assert np.all(c.fault[before] == 0) and np.all(c.fault[~before] == FAULTS.index(kind))
    for ch in ("temperature", "vibration", "pressure"):
        np.testing.assert_array_equal(getattr(c, ch)[before], getattr(normal, ch)[before])


def test_degradation_starts_subtle(normal, faulty) -> None:
    """In the first 10 % of degradation no fault moves a channel's running mean by much."""
    for kind, c in faulty.items():
        m = hours_mask(c, 1.0, 1.5) & running(normal)
        for ch, tol in (("temperature", 0.5), ("pressure", 0.1)):
            diff = np.mean(getattr(c, ch)[m] - getattr(normal, ch)[m])
            assert abs(diff) < tol, (kind, ch, diff)
        if kind != "imbalance":  # imbalance is a step by definition
            dv = np.mean(c.vibration[m] - normal.vibration[m])
            assert abs(dv) < 0.2, (kind, dv)


def test_bearing_wear_vibration_trend_bursts_and_heat(normal, faulty) -> None:
    c = faulty["bearing_wear"]
    r = running(normal)
    diffs = [
        np.mean(c.vibration[hours_mask(c, h, h + 1) & r] - normal.vibration[hours_mask(c, h, h + 1) & r])
        for h in range(1, 6)
    ]
    assert all(b > a for a, b in itertools.pairwise(diffs)), diffs  # monotone trend
    assert diffs[-1] > 1.0
    late = hours_mask(c, 5, 6) & r
    resid = c.vibration[late] - normal.vibration[late]
    assert np.percentile(resid, 99.5) > 3 * np.median(resid)  # bursts on top of the trend
    assert np.mean(c.temperature[late] - normal.temperature[late]) > 3.0


def test_cavitation_drops_pressure_and_raises_vibration(normal, faulty) -> None:
    c = faulty["cavitation"]
    m = hours_mask(c, 6, HOURS) & (normal.pressure > 3.5)  # high load: where cavitation is worst
    assert m.sum() > 600
    assert np.mean(c.pressure[m] - normal.pressure[m]) < -0.5
    assert np.mean(c.vibration[m] - normal.vibration[m]) > 0.5
    assert np.std(c.pressure[m] - normal.pressure[m]) > 0.1  # fluctuating, not a plain offset


def test_seal_leak_lowers_pressure_at_equal_load(normal, faulty) -> None:
    c = faulty["seal_leak"]
    m = hours_mask(c, 6, HOURS) & running(normal)
    rel = (c.pressure[m] - normal.pressure[m]) / normal.pressure[m]
    assert np.mean(rel) < -0.15
    # ... and unsteadily: the leak spurts, so pressure jitters far more than a healthy pump's.
    jitter = np.std(np.diff(c.pressure[m])) / np.std(np.diff(normal.pressure[m]))
    assert jitter > 3.0
    # Vibration is not what reveals a seal leak.
    assert abs(np.mean(c.vibration[m] - normal.vibration[m])) < 0.05


def test_cooling_failure_raises_temperature_residual_only(normal, faulty) -> None:
    c = faulty["cooling_failure"]
    early, late = hours_mask(c, 2, 3) & running(normal), hours_mask(c, 6, HOURS) & running(normal)
    d_early = np.mean(c.temperature[early] - normal.temperature[early])
    d_late = np.mean(c.temperature[late] - normal.temperature[late])
    assert d_late > 8.0 and d_late > 4 * max(d_early, 0.1)
    np.testing.assert_array_equal(c.pressure, normal.pressure)
    np.testing.assert_array_equal(c.vibration, normal.vibration)


def test_imbalance_steps_vibration_at_onset(normal, faulty) -> None:
    c = faulty["imbalance"]
    r = running(normal)
    just_after = hours_mask(c, 1, 1.25) & r
    if just_after.sum() < 100:
        pytest.skip("pump not running right after onset for this seed")
    step = np.mean(c.vibration[just_after] - normal.vibration[just_after])
    assert step > 0.5
    late = hours_mask(c, 6, HOURS) & r
    assert np.mean(c.vibration[late] - normal.vibration[late]) > step + 1.5


def test_failure_can_be_repaired_in_mixed() -> None:
    sc = build_scenario("mixed", devices=2, horizon=24 * H, seed=1)
    assert {f.kind for f in sc.machine_faults} == set(MACHINE_FAULTS)
    assert {f.device for f in sc.machine_faults} == {0, 1}
    f = sc.machine_faults_of(0)[0]
    c = simulate(1, 0, sc, START, f.start + f.degradation + f.repair_after + 600)
    assert MACHINE_STATES[c.machine_state[-1]] == "normal" and c.fault[-1] == 0
    assert (c.machine_state == MACHINE_STATES.index("failed")).any()


def test_simulation_is_deterministic_per_seed() -> None:
    sc = build_scenario("bearing_wear", devices=1, horizon=2 * H, seed=0)
    a = PumpSim(11, 0, sc, START).next_block()
    b = PumpSim(11, 0, sc, START).next_block()
    c = PumpSim(12, 0, sc, START).next_block()
    np.testing.assert_array_equal(a.vibration, b.vibration)
    assert not np.array_equal(a.vibration, c.vibration)
