"""Product-path evaluation (training.product_eval) and the non-ratcheting RollingMedian threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_threshold as tt
from agent_proc import MODEL

from agent.bundle import load_bundle
from agent.pipeline import StageSettings
from agent.recording import Recording
from agent.threshold import RollingMedian, RollingPercentile, ThresholdConfig, make_thresholder
from firmware_sim.record import DEFAULT_START, record
from firmware_sim.scenario import build_scenario
from training.default_model import product_markdown
from training.product_eval import decide, replay_product, rescore, summarise

# -- RollingMedian ------------------------------------------------------------------------------------
MED = tt.SMALL.model_copy(update={"kind": "rolling_median"})
RATIO = tt.CAL["p99"] / tt.CAL["p50"]  # 3.0: the default quantile 0.99 over p50


@pytest.mark.parametrize(
    "check",
    [
        tt.test_conformance_judgement_is_consistent,
        tt.test_conformance_anomalous_judgements_do_not_move_it,
        tt.test_conformance_numpy_scores_give_plain_python_judgements,
    ],
    ids=lambda f: f.__name__,
)
def test_rolling_median_passes_the_thresholder_conformance_suite(check) -> None:
    check(lambda config, cal, db=None, model_id=None: RollingMedian(MED, cal, db, model_id))


def test_rolling_median_survives_a_restart_and_starts_at_start(db_path: Path) -> None:
    tt.test_conformance_survives_a_restart(
        lambda c, cal, db=None, m=None: RollingMedian(MED, cal, db, m), db_path
    )
    assert RollingMedian(MED, tt.CAL).threshold("never-seen") == tt.START
    assert isinstance(make_thresholder(MED, tt.CAL), RollingMedian)


def test_rolling_median_is_calibration_ratio_times_median() -> None:
    t = RollingMedian(MED, tt.CAL)
    errors = np.random.default_rng(2).uniform(1.1, 2.9, 150)  # all normal (< floor 3.0), median ~2
    tt.feed(t, errors)
    expected = RATIO * float(np.median(errors[-MED.history :]))
    assert expected > tt.FLOOR  # the device runs above calibration: its level lifts the threshold
    assert t.threshold("pump-01") == pytest.approx(expected, rel=1e-12)
    quiet = RollingMedian(MED, tt.CAL)
    tt.feed(quiet, errors / 4)  # a quiet device: never below the floor
    assert quiet.threshold("pump-01") == tt.FLOOR


def test_rolling_median_does_not_ratchet_under_a_slow_degradation() -> None:
    """Scores creeping just under the threshold for 40 % of the history: a rolling q99 climbs with them
    (each step lifts the bar for the next), the median-based threshold barely moves."""
    healthy = np.random.default_rng(3).uniform(1.3, 1.7, 100)  # median 1.5: threshold 4.5, above the floor
    med, pct = RollingMedian(MED, tt.CAL), RollingPercentile(tt.SMALL, tt.CAL)
    for t in (med, pct):
        tt.feed(t, healthy)
    before = {t: t.threshold("pump-01") for t in (med, pct)}
    for t in (med, pct):
        for i in range(40):
            j = t.classify(tt.score(0.97 * t.threshold("pump-01"), ts=1000.0 + i))
            assert not j.anomalous
            t.learn_one(j)
    assert med.threshold("pump-01") < 1.1 * before[med]
    assert pct.threshold("pump-01") > 2 * before[pct]


def test_rolling_median_refuses_a_calibration_without_a_positive_p50_or_an_uncalibrated_quantile() -> None:
    with pytest.raises(ValueError, match="p50"):
        RollingMedian(MED, {**tt.CAL, "p50": 0.0})
    with pytest.raises(ValueError, match="calibrated quantile"):
        RollingMedian(MED.model_copy(update={"quantile": 0.95}), tt.CAL)


# -- product-path evaluation --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bearing_day(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two pumps, 40 min, bearing wear on pump-01 after 10 min (the demo's scenario, shortened)."""
    p = tmp_path_factory.mktemp("q") / "bearing.csv"
    scen = build_scenario("bearing_wear", 2, 2400.0, fault_after=600.0, degradation=900.0, seed=7)
    record(p, 7, 2, scen, int(DEFAULT_START.timestamp() * 1000), 2400.0)
    return p


@pytest.mark.timeout(120)
def test_offline_decisions_equal_the_product_replay(bearing_day: Path) -> None:
    """decide() on the replay's own scores must reproduce the pipeline's alerts exactly: it is what
    the Isolation Forest is judged by, so any drift from the product would make that comparison unfair."""
    from agent.replay import load_inputs

    bundle = load_bundle(MODEL)
    recs: list[Recording] = load_inputs([bearing_day], bundle.manifest.channel_names)
    cap = replay_product(bundle, recs, StageSettings(), keep_windows=True)
    assert len(cap.windows) == len(cap.result.judgements) > 0
    scores = [j.score for j in cap.result.judgements]
    offline = decide(scores, recs, bundle.manifest.calibration.quantiles, StageSettings(), bundle.model_id)
    live = {d: [(o, r) for _, o, r, _ in v] for d, v in cap.result.alert_spans().items()}
    assert {d: [(o, r) for _, o, r, _ in v] for d, v in offline.alert_spans().items()} == live
    assert [j.threshold for j in offline.judgements] == [j.threshold for j in cap.result.judgements]
    s = summarise(cap.result)
    assert s["event"]["n_events"] == 1 and s["event"]["n_detected"] == 1
    assert s["false_alerts_per_device_day"] == 0
    assert set(s["per_fault"]) == {"bearing_wear"}
    md = product_markdown({"day": {"file": "b.csv", "windows": len(scores), "rows": {"lstm_ae": s}}})
    assert "| **lstm_ae** | 1/1 |" in md and "| bearing_wear | 1 | 1 |" in md
    # another detector's scores on the same windows: all-zero scores can never alert
    zero = decide(rescore(scores, np.zeros(len(scores)), "zero"), recs, bundle.manifest.calibration.quantiles)
    assert zero.alert_spans() == {} and summarise(zero)["event"]["n_detected"] == 0


def test_rolling_median_config_is_accepted_by_the_stage_settings() -> None:
    st = StageSettings(threshold=ThresholdConfig(kind="rolling_median"))
    assert st.threshold.kind == "rolling_median"
