"""Thresholders: calibration start, rolling convergence, exclusion of anomalies, bounds, restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils

from agent import metrics
from agent.db import open_db
from agent.threshold import (
    FixedThreshold,
    RollingMedian,
    RollingPercentile,
    Smoothed,
    ThresholdConfig,
    Thresholder,
    _quantile,
    make_thresholder,
)
from agent.types import Judgement, Score

CAL = {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p99.5": 3.5, "p99.9": 5.0}
FLOOR, START, CEILING = 3.0, 5.0, 10.0  # with the default factors (1.0 x p99, p99.9, 2.0 x p99.9)
SMALL = ThresholdConfig(history=100, min_history=20, persist_every_s=3600)


def score(error: float, device: str = "pump-01", ts: float = 0.0, model_id: str = "m-1") -> Score:
    return Score(device=device, start_ts=ts - 1, end_ts=ts, error=error, channel_errors={}, model_id=model_id)


def feed(t: Thresholder, errors, device: str = "pump-01", model_id: str = "m-1") -> list[Judgement]:
    out = []
    for i, e in enumerate(errors):
        j = t.classify(score(float(e), device, float(i), model_id))
        t.learn_one(j)
        out.append(j)
    return out


def test_starts_at_calibration_quantile() -> None:
    t = RollingPercentile(SMALL, CAL)
    assert t.threshold("pump-01") == START
    assert not t.classify(score(4.99)).anomalous
    j = t.classify(score(5.01))
    assert j.anomalous and j.threshold == START
    assert RollingPercentile(SMALL.model_copy(update={"start_quantile": "p99.5"}), CAL).threshold("x") == 3.5


def test_converges_to_margin_times_rolling_quantile_of_last_n() -> None:
    rng = np.random.default_rng(1)
    errors = rng.uniform(2.0, 4.0, 350)
    t = RollingPercentile(SMALL, CAL)
    judgements = feed(t, errors)
    # before min_history normal scores the start value holds
    assert all(j.threshold == START for j in judgements[: SMALL.min_history])
    learnt = [j.score.error for j in judgements if not j.anomalous]
    expected = SMALL.margin * np.quantile(learnt[-SMALL.history :], SMALL.quantile)
    assert t.threshold("pump-01") == pytest.approx(expected, rel=1e-12)
    assert FLOOR < expected < CEILING  # the test data sits inside the bounds, so the rolling value shows
    assert metrics.REGISTRY.get_sample_value("edgewatch_threshold", {"device": "pump-01"}) == pytest.approx(
        expected
    )


def test_anomalous_scores_do_not_enter_the_baseline() -> None:
    rng = np.random.default_rng(2)
    t = RollingPercentile(SMALL, CAL)
    feed(t, rng.uniform(2.0, 3.0, 60))
    before = t.threshold("pump-01")
    history_before = t.history("pump-01").copy()
    judgements = feed(t, [50.0] * 30)
    assert all(j.anomalous for j in judgements)
    assert t.threshold("pump-01") == before
    np.testing.assert_array_equal(t.history("pump-01"), history_before)


def test_floor_holds_when_scores_are_tiny() -> None:
    t = RollingPercentile(SMALL, CAL)
    feed(t, np.full(100, 0.01))
    assert t.threshold("pump-01") == FLOOR


def test_ceiling_stops_a_slow_degradation_from_hiding_itself() -> None:
    t = RollingPercentile(SMALL, CAL)
    feed(t, np.full(30, 2.5))
    seen = []
    for i in range(2000):  # each score just under the current threshold: always "normal", always learnt
        j = t.classify(score(0.97 * t.threshold("pump-01"), ts=float(i)))
        t.learn_one(j)
        seen.append(j.threshold)
    assert max(seen) == CEILING
    assert t.threshold("pump-01") == CEILING
    assert t.classify(score(CEILING * 1.01)).anomalous


def test_devices_are_independent() -> None:
    t = RollingPercentile(SMALL, CAL)
    feed(t, np.full(50, 4.0), device="a")
    assert t.threshold("a") == pytest.approx(6.0)
    assert t.threshold("b") == START


def test_state_restored_after_reopening_the_database(db_path: Path) -> None:
    rng = np.random.default_rng(3)
    errors = rng.uniform(2.0, 4.0, 400)
    twin = RollingPercentile(SMALL, CAL)  # never restarts
    twin_thr = [j.threshold for j in feed(twin, errors)]

    db = open_db(db_path)
    t = RollingPercentile(SMALL, CAL, db)
    first = [j.threshold for j in feed(t, errors[:250])]
    t.save()
    db.conn.close()

    db2 = open_db(db_path)
    t2 = RollingPercentile(SMALL, CAL, db2)
    assert t2.threshold("pump-01") == t.threshold("pump-01")
    np.testing.assert_array_equal(t2.history("pump-01"), t.history("pump-01"))
    rest = []
    for i, e in enumerate(errors[250:]):
        j = t2.classify(score(float(e), ts=250.0 + i))
        t2.learn_one(j)
        rest.append(j.threshold)
    assert first + rest == twin_thr  # the restart is invisible
    db2.conn.close()


def test_persists_at_most_every_interval_and_on_save(fresh_db: sqlite_utils.Database) -> None:
    t = RollingPercentile(SMALL, CAL, fresh_db)
    feed(t, np.full(30, 2.0))
    assert fresh_db.execute("SELECT count(*) FROM state").fetchone()[0] == 0
    t.save()
    (value,) = fresh_db.execute("SELECT value_json FROM state WHERE key = 'threshold:pump-01'").fetchone()
    assert '"model_id": "m-1"' in value


def test_a_thresholder_for_another_model_does_not_restore_the_old_baseline(
    fresh_db: sqlite_utils.Database,
) -> None:
    t = RollingPercentile(SMALL, CAL, fresh_db, model_id="m-1")
    feed(t, np.full(50, 4.0))
    t.save()
    assert RollingPercentile(SMALL, CAL, fresh_db, model_id="m-1").threshold("pump-01") == pytest.approx(6.0)
    assert RollingPercentile(SMALL, CAL, fresh_db, model_id="m-2").threshold("pump-01") == START


def test_new_model_starts_a_new_baseline(fresh_db: sqlite_utils.Database) -> None:
    t = RollingPercentile(SMALL, CAL, fresh_db)
    feed(t, np.full(50, 4.0))
    t.save()
    assert t.threshold("pump-01") == pytest.approx(6.0)
    t2 = RollingPercentile(SMALL, CAL, fresh_db)
    assert t2.classify(score(4.0, model_id="m-2")).threshold == START
    assert len(t2.history("pump-01")) == 0


def test_reset_relearns_a_new_normal_under_the_ceiling() -> None:
    t = RollingPercentile(SMALL, CAL)
    feed(t, np.full(50, 2.0))
    assert t.threshold("pump-01") == FLOOR
    # a level shift the operator accepts: 6.0 is anomalous against the old baseline
    assert t.classify(score(6.0)).anomalous
    t.reset("pump-01")
    assert t.threshold("pump-01") == CEILING
    judgements = feed(t, np.full(SMALL.min_history, 6.0))
    assert not any(j.anomalous for j in judgements)
    assert t.threshold("pump-01") == pytest.approx(9.0)  # 1.5 x the new normal
    assert t.classify(score(9.5)).anomalous


def test_bad_calibration_and_bad_scores_fail_clearly() -> None:
    with pytest.raises(ValueError, match=r"missing \['p99.9'\]"):
        RollingPercentile(SMALL, {"p99": 3.0})
    with pytest.raises(ValueError, match="positive finite"):
        RollingPercentile(SMALL, {**CAL, "p99": float("nan")})
    with pytest.raises(ValueError, match="positive finite"):
        RollingPercentile(SMALL, {**CAL, "p99.9": 0.0})
    assert RollingPercentile(SMALL, {**CAL, "p99": 0.0}).floor == 0.0  # a zero floor is harmless
    with pytest.raises(ValueError, match="above the ceiling"):
        RollingPercentile(SMALL.model_copy(update={"floor_factor": 5.0}), CAL)
    t = RollingPercentile(SMALL, CAL)
    with pytest.raises(ValueError, match="non-finite score"):
        t.classify(score(float("nan")))


# -- conformance: every thresholder class passes the same suite ---------------------------------------
Factory = Callable[..., Thresholder]  # (config, calibration, db, model_id=None)
THRESHOLDERS: list[Factory] = [RollingMedian, RollingPercentile, FixedThreshold]


@pytest.fixture(params=THRESHOLDERS, ids=lambda f: f.__name__)
def factory(request: pytest.FixtureRequest) -> Factory:
    return request.param


def test_conformance_judgement_is_consistent(factory: Factory) -> None:
    t = factory(SMALL, CAL, None)
    rng = np.random.default_rng(4)
    for i, e in enumerate(rng.lognormal(0.8, 0.6, 300)):
        s = score(float(e), ts=float(i))
        expected_thr = t.threshold("pump-01")
        j = t.classify(s)
        assert j.score is s
        assert j.threshold == expected_thr
        assert j.anomalous == (s.error > j.threshold)
        assert FLOOR <= j.threshold <= CEILING
        t.learn_one(j)


def test_conformance_starts_at_start_value(factory: Factory) -> None:
    assert factory(SMALL, CAL, None).threshold("never-seen") == START


def test_conformance_anomalous_judgements_do_not_move_it(factory: Factory) -> None:
    t = factory(SMALL, CAL, None)
    feed(t, np.full(40, 2.5))
    before = t.threshold("pump-01")
    feed(t, np.full(40, 99.0))
    assert t.threshold("pump-01") == before


def test_conformance_survives_a_restart(factory: Factory, db_path: Path) -> None:
    db = open_db(db_path)
    t = factory(SMALL, CAL, db)
    feed(t, np.random.default_rng(5).uniform(1.0, 4.0, 120))
    t.save()
    before = t.threshold("pump-01")
    db.conn.close()
    db2 = open_db(db_path)
    assert factory(SMALL, CAL, db2).threshold("pump-01") == before
    db2.conn.close()


def test_make_thresholder_picks_the_configured_kind() -> None:
    assert isinstance(make_thresholder(SMALL, CAL), RollingPercentile)
    assert isinstance(make_thresholder(SMALL.model_copy(update={"kind": "fixed"}), CAL), FixedThreshold)


@pytest.mark.parametrize("factory", THRESHOLDERS, ids=lambda f: f.__name__)
def test_conformance_numpy_scores_give_plain_python_judgements(factory: Factory) -> None:
    t = factory(SMALL, CAL, None)
    for e in (np.float32(2.0), np.float32(7.0)):
        j = t.classify(score(e))
        assert type(j.anomalous) is bool and type(j.threshold) is float
        t.learn_one(j)


@pytest.mark.parametrize("n", [1, 2, 7, 200, 2000])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.999])
def test_fast_quantile_matches_numpy(n: int, q: float) -> None:
    rng = np.random.default_rng(n)
    for _ in range(20):
        values = rng.lognormal(0.0, 1.0, n)
        assert _quantile(values, q) == np.quantile(values, q)


# -- smoothing and the fixed value ---------------------------------------------------------------------
def test_smoothed_judges_the_per_device_ewma() -> None:
    cfg = SMALL.model_copy(update={"kind": "fixed", "ewma_alpha": 0.25})
    t = make_thresholder(cfg, CAL)
    assert isinstance(t, Smoothed)
    errors = [1.0, 9.0, 9.0, 9.0, 9.0, 1.0]
    got = [j.score.error for j in feed(t, errors)]
    expect, m = [], errors[0]  # the mean starts at the first score
    for e in errors:
        m = 0.25 * e + 0.75 * m
        expect.append(m)
    assert got == pytest.approx(expect)
    # a single spike over the threshold (START = 5) is not judged anomalous, a sustained one is
    assert [j.anomalous for j in feed(make_thresholder(cfg, CAL), errors)] == [e > START for e in expect]
    assert not feed(make_thresholder(cfg, CAL), [1.0, 9.0])[-1].anomalous
    # devices do not share a mean; reset forgets it
    feed(t, [100.0], device="pump-02")
    assert feed(t, [1.0])[0].score.error == pytest.approx(0.25 * 1.0 + 0.75 * expect[-1])
    t.reset("pump-01")
    assert feed(t, [7.0])[0].score.error == 7.0


def test_fixed_value_overrides_the_calibration_start() -> None:
    t = make_thresholder(SMALL.model_copy(update={"kind": "fixed", "value": 42.0}), CAL)
    assert t.threshold("pump-01") == 42.0
    assert [j.anomalous for j in feed(t, [41.0, 43.0])] == [False, True]
    with pytest.raises(ValueError, match="only used with kind = 'fixed'"):
        ThresholdConfig(kind="rolling_median", value=3.0)
    with pytest.raises(ValueError):
        ThresholdConfig(ewma_alpha=0.0)
