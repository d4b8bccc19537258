"""Drift: PSI by hand, the bundle's training distribution, and a simulator day whose calibration drifts."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import sqlite_utils
from conftest import write_agent_config

from agent.buffer import Buffer, BufferConfig
from agent.bundle import InputStats, Manifest, load_bundle
from agent.drift import DriftConfig, DriftMonitor, _bins, median_shift, psi
from agent.recording import iter_readings, read_recording
from firmware_sim.record import DEFAULT_START, record
from firmware_sim.scenario import build_scenario

ROOT = Path(__file__).resolve().parents[1]
DAY = 86400.0


def test_psi_hand_worked() -> None:
    edges, expected = np.array([1.0]), np.array([0.5, 0.5])
    assert psi(np.array([0.0, 2.0]), edges, expected) == pytest.approx(0.0)
    # 3 of 4 values in the upper bin: (0.25 - 0.5) ln(0.5) + (0.75 - 0.5) ln(1.5)
    want = -0.25 * math.log(0.5) + 0.25 * math.log(1.5)
    assert psi(np.array([0.0, 2.0, 3.0, 4.0]), edges, expected) == pytest.approx(want)
    # NaN is ignored, not counted as 0 (which would land in the lower bin)
    assert psi(np.array([0.0, 2.0, np.nan, np.nan]), edges, expected) == pytest.approx(0.0)
    assert math.isnan(psi(np.array([np.nan]), edges, expected))
    # an empty bin is floored, not infinite
    assert math.isfinite(psi(np.array([5.0, 6.0]), edges, expected))


def test_bins_merge_tied_quantiles() -> None:
    # a quarter of the training values sat exactly at 2.0: [2, 3) holds the tie and (2, 3) itself
    edges, shares = _bins([0, 25, 50, 75, 100], [1.0, 2.0, 2.0, 3.0, 4.0])
    assert edges.tolist() == [2.0, 3.0] and shares.tolist() == pytest.approx([0.25, 0.5, 0.25])
    assert sum(shares) == pytest.approx(1.0)


def test_median_shift_hand_worked() -> None:
    assert median_shift(np.array([4.0, 5.0, 9.0]), 3.0, 2.0, 0.1) == pytest.approx(1.0)
    assert median_shift(np.array([1.0]), 3.0, 2.0, 0.1) == pytest.approx(-1.0)
    # a reference that sat still (IQR 0) is floored, not divided by zero
    assert median_shift(np.array([3.5]), 3.0, 0.0, 0.25) == pytest.approx(2.0)
    assert math.isnan(median_shift(np.array([]), 3.0, 2.0, 0.1))


def test_input_stats_are_validated() -> None:
    with pytest.raises(ValueError, match="rise from 0 to 100"):
        InputStats(levels=[0, 50, 90], quantiles=[[1, 2, 3]])
    with pytest.raises(ValueError, match="non-decreasing"):
        InputStats(levels=[0, 50, 100], quantiles=[[1, 3, 2]])
    m = load_bundle(ROOT / "models" / "default").manifest
    assert m.input_stats is not None and len(m.input_stats.quantiles) == len(m.channels)
    with pytest.raises(ValueError, match=r"input_stats\.quantiles has 1 channels"):
        Manifest.model_validate(
            {**m.model_dump(), "input_stats": {"levels": [0, 50, 100], "quantiles": [[1, 2, 3]]}}
        )


def _days_into_db(
    tmp: Path, scenario: str, days: int = 3, devices: int = 2, seed: int = 31
) -> tuple[sqlite_utils.Database, float]:
    """Simulated days (1 Hz) stored by the agent's buffer, as the live agent stores them; a scenario's
    fault starts after the first day and ends with the recording."""
    csv = tmp / f"{scenario}.csv"
    start_ms = int(DEFAULT_START.timestamp() * 1000)
    sc = build_scenario(
        scenario, devices, days * DAY, fault_after=DAY, degradation=(days - 1) * DAY, seed=seed
    )
    record(csv, seed, devices, sc, start_ms, days * DAY)
    db = sqlite_utils.Database(tmp / "agent.db")
    from agent.db import migrate

    migrate(db)
    buf = Buffer(db, BufferConfig())
    for r in iter_readings(read_recording(csv)):
        buf.add(r)
    buf.flush()
    return db, start_ms / 1000


@pytest.fixture(scope="module")
def drift_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[sqlite_utils.Database, float]:
    return _days_into_db(tmp_path_factory.mktemp("drift"), "sensor_drift")


def test_a_drifting_temperature_sensor_is_named_and_healthy_pumps_are_not(drift_db) -> None:
    db, t0 = drift_db
    bundle = load_bundle(ROOT / "models" / "default")
    mon = DriftMonitor(DriftConfig(), bundle.manifest, bundle.model_id, "gw-test")

    # first day: the reference is not complete, nothing is judged (and nothing is stored)
    early = {d.device: d for d in mon.check(db, t0 + 0.5 * DAY)}
    assert set(early) == {"pump-01", "pump-02"}
    for d in early.values():
        assert d.state == "learning" and d.reference is None and d.drifted == []
        assert all(c["shift"] is None for c in d.channels.values())
        # the distance from the training data is reported all the same
        assert all(c["psi_train"] is not None for c in d.channels.values())
    assert db.execute("SELECT count(*) FROM state WHERE key LIKE 'drift_ref:%'").fetchone()[0] == 0

    # third day: the calibration of pump-01's temperature has drifted for two days
    result = {d.device: d for d in mon.check(db, t0 + 3 * DAY)}
    drifted = result["pump-01"]
    assert drifted.state == "drifted" and drifted.drifted == ["temperature"], drifted.channels
    temp = drifted.channels["temperature"]
    assert temp["shift"] > DriftConfig().shift_threshold and temp["recent_median"] > temp["reference_median"]
    assert drifted.reference == {
        "since": pytest.approx(t0, abs=1.0),
        "until": pytest.approx(t0 + DAY, abs=1.0),
    }
    healthy = result["pump-02"]
    assert healthy.state == "stable" and healthy.drifted == [], healthy.channels
    assert all(abs(c["shift"]) < DriftConfig().shift_threshold for c in healthy.channels.values())
    # no scores stored: the score is not judged (null), not called stable or drifted
    assert drifted.score["ratio"] is None and drifted.score["n"] == 0 and not drifted.score["drifted"]
    # the reference was stored and is reused (not relearnt from a later period)
    stored = db.execute("SELECT count(*) FROM state WHERE key LIKE 'drift_ref:%'").fetchone()[0]
    assert stored == 2
    # the messages validate against the published schema
    doc = json.loads(resources.files("agent").joinpath("schemas", "drift.json").read_text())
    events = mon.events(db, t0 + 3 * DAY)
    for ev in events:
        jsonschema.validate(ev.payload, doc)
        assert ev.topic_kind == "drift" and ev.device == ev.payload["device"]
    assert [ev.payload["state"] for ev in events] == ["drifted", "stable"]

    # after the sensor is recalibrated, forgetting its reference learns a new one from later data
    assert mon.forget_reference(db, t0 + 3 * DAY, "pump-01") == 1
    assert {d.device: d.state for d in mon.check(db, t0 + 3 * DAY)} == {
        "pump-01": "learning",
        "pump-02": "stable",
    }


def test_healthy_pumps_are_stable_against_their_reference(tmp_path: Path) -> None:
    """The false-alarm side: healthy pumps of another seed, judged on the second and third day."""
    db, t0 = _days_into_db(tmp_path, "normal", days=3, devices=2, seed=7)
    bundle = load_bundle(ROOT / "models" / "default")
    mon = DriftMonitor(DriftConfig(), bundle.manifest, bundle.model_id, "gw")
    for day in (2, 3):
        for d in mon.check(db, t0 + day * DAY):
            assert d.state == "stable", (day, d.device, d.channels)


def test_score_drift_against_the_reference(tmp_path: Path) -> None:
    bundle = load_bundle(ROOT / "models" / "default")
    db = sqlite_utils.Database(tmp_path / "s.db")
    from agent.db import migrate

    migrate(db)
    rng = np.random.default_rng(3)
    step = 300.0  # a score every 5 minutes: 288 a day
    n = int(3 * DAY / step)
    base = rng.lognormal(np.log(0.015), 0.3, n)
    grown = base.copy()
    grown[int(2 * DAY / step) :] *= 2.0  # the third day the model fits pump-02 half as well
    for dev, errs in (("pump-01", base), ("pump-02", grown)):
        db["scores"].insert_all(
            {
                "device": dev,
                "start_ts": i * step,
                "end_ts": i * step + 64,
                "error": float(e),
                "threshold": 1.0,
                "anomalous": 0,
                "channel_errors_json": "{}",
                "model_id": bundle.model_id,
            }
            for i, e in enumerate(errs)
        )
        db["readings"].insert(
            {"device": dev, "ts": 3 * DAY - 10, "seq": 1, "received": 0.0, "values_json": "{}"}
        )
    mon = DriftMonitor(DriftConfig(), bundle.manifest, bundle.model_id, "gw")
    res = {d.device: d for d in mon.check(db, 3 * DAY)}
    assert res["pump-01"].score["ratio"] == pytest.approx(1.0, abs=0.15) and res["pump-01"].state == "stable"
    assert res["pump-02"].score["ratio"] == pytest.approx(2.0, rel=0.15) and res["pump-02"].drifted == [
        "score"
    ]
    # readings with no values are not judged (no channel), which does not make them stable or drifted
    assert all(c["shift"] is None for c in res["pump-02"].channels.values())
    # scores of another model are not compared with this model's reference
    other = DriftMonitor(DriftConfig(), bundle.manifest, "other-model", "gw")
    assert all(d.score["n"] == 0 and d.state == "learning" for d in other.check(db, 3 * DAY))


def test_a_bundle_without_training_distribution_is_refused_clearly() -> None:
    m = load_bundle(ROOT / "models" / "default").manifest.model_copy(update={"input_stats": None})
    with pytest.raises(ValueError, match="no input_stats"):
        DriftMonitor(DriftConfig(), m, "x", "gw")


def test_the_agent_publishes_drift_through_its_outbox_and_follows_a_model_swap(tmp_path: Path) -> None:
    """The scheduled job of the running agent: the agent's own buffer, the [drift] settings, one drift
    message per device in the outbox on <prefix>/<gateway>/<device>/drift, and a monitor that is
    rebuilt for the new model when a bundle is swapped in."""
    import shutil

    from agent.config import load_config
    from agent.service import Agent

    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "default", model)
    cfg = write_agent_config(
        tmp_path,
        "gw-drift",
        model,
        "shadow_windows = 0",
        """[uplink]
topic_prefix = "plant"
[uplink.mqtt]
host = "127.0.0.1"
port = 1
[metrics]
enabled = false
[drift]
interval_s = 600
""",
    )
    agent = Agent(load_config(cfg), sources=[])
    try:
        csv = tmp_path / "hour.csv"
        start_ms = int(DEFAULT_START.timestamp() * 1000)
        record(
            csv,
            31,
            1,
            build_scenario("normal", 1, 3600.0, fault_after=None, degradation=None, seed=31),
            start_ms,
            3600.0,
        )
        for r in iter_readings(read_recording(csv)):
            agent.pipeline.process_reading(r, now=None)
        end = start_ms / 1000 + 3600.0
        assert agent.drift is not None and agent.drift.model_id == agent.bundle.model_id
        assert agent.check_drift(now=end) == 1
        rows = [r for r in agent.outbox.peek(1000) if r.topic.endswith("/drift")]
        assert [r.topic for r in rows] == ["plant/gw-drift/pump-01/drift"]
        payload = json.loads(rows[0].payload)
        # an hour of data: the day-long reference is still being learnt; the windows were scored
        assert payload["state"] == "learning" and payload["model_id"] == agent.bundle.model_id
        assert payload["score"]["n"] > 0 and payload["channels"]["temperature"]["psi_train"] is not None
        # the same check again is the same message id: a consumer sees one drift report per check time
        assert agent.check_drift(now=end) == 1
        assert len([r for r in agent.outbox.peek(1000) if r.topic.endswith("/drift")]) == 1

        # a bundle without a training distribution still scores, but its drift check is off
        from agent.bundle import finalize_bundle

        m = load_bundle(model).manifest
        finalize_bundle(
            model, m.model_copy(update={"input_stats": None, "created_at": "2030-01-01T00:00:00Z"})
        )
        agent.check_model()
        assert agent.bundle.manifest.input_stats is None and agent.drift is None
        assert agent.check_drift(now=end) == 0
        # and a model with one follows the swap: the monitor judges the new model's scores
        finalize_bundle(model, m.model_copy(update={"created_at": "2030-01-02T00:00:00Z"}))
        agent.check_model()
        assert (
            agent.drift is not None and agent.drift.model_id == agent.bundle.model_id != payload["model_id"]
        )
    finally:
        agent.shutdown()
