"""Model rollout: a new bundle is scored in shadow beside the current one (both scores stored, verdicts
compared), then promoted; one that disagrees wildly is refused, one that fails in shadow is dropped,
and one that fails after its promotion is rolled back. Real bundles, real SQLite, the service's loop."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from conftest import write_agent_config

from agent.bundle import Manifest, finalize_bundle, load_bundle
from agent.config import load_config
from agent.recording import iter_readings, read_recording
from agent.service import Agent
from agent.types import Judgement, RawMessage, Reading
from firmware_sim.wire import encode_json_batch

ROOT = Path(__file__).resolve().parents[1]
EDGEWATCH = str(Path(sys.executable).parent / "edgewatch")
N = 30  # shadow windows


@pytest.fixture(scope="module")
def readings(tmp_path_factory: pytest.TempPathFactory) -> list[Reading]:
    out = tmp_path_factory.mktemp("rec") / "normal.csv"
    subprocess.run(
        [
            EDGEWATCH,
            "sim",
            "record",
            "--out",
            str(out),
            "--devices",
            "1",
            "--duration",
            "2400",
            "--seed",
            "3",
        ],
        check=True,
        capture_output=True,
    )
    return list(iter_readings(read_recording(out)))


def make_agent(tmp_path: Path, min_agreement: float = 0.9) -> tuple[Agent, Path]:
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "default", model)
    cfg = write_agent_config(
        tmp_path,
        "gw-roll",
        model,
        f"shadow_windows = {N}\nmin_agreement = {min_agreement}",
        """[uplink]
enabled = false
[metrics]
enabled = false
[screen]
enabled = false  # both models score every window, so every shadow window is compared
""",
    )
    return Agent(load_config(cfg), sources=[]), model


def feed(agent: Agent, readings: list[Reading]) -> None:
    """Through the service's own loop step (_handle), which also advances the rollout."""
    for r in readings:
        agent._handle(lambda r=r: agent.pipeline.process_reading(r, now=None))


def new_bundle(model: Path, **changes: object) -> str:
    """Rewrite the bundle in place with manifest changes (a new model id); returns that id."""
    m = Manifest.model_validate(json.loads((model / "manifest.json").read_text()))
    finalize_bundle(model, m.model_copy(update={"created_at": "2031-01-01T00:00:00Z", **changes}))
    return load_bundle(model).model_id


def scores_of(agent: Agent, model_id: str) -> dict[float, float]:
    rows = agent.db.execute("SELECT end_ts, error FROM scores WHERE model_id = ?", [model_id]).fetchall()
    return {round(t, 3): e for t, e in rows}


def test_a_new_model_is_scored_in_shadow_then_promoted(tmp_path: Path, readings: list[Reading]) -> None:
    agent, model = make_agent(tmp_path)
    old = agent.bundle.model_id
    feed(agent, readings[:600])
    new = new_bundle(model)  # the same weights: it must agree on every window
    agent.check_model()
    assert agent.bundle.model_id == old and agent.pipeline.shadow.model_id == new
    status = agent.status()["rollout"]
    assert status["shadow_model_id"] == new and status["windows"] == 0 and "result" not in status

    seen = []
    agent.pipeline._on_judgement = seen.append
    feed(agent, readings[600:900])  # 300 readings, stride 8: about 37 windows, promotion after 30
    assert agent.bundle.model_id == new and agent.pipeline.shadow is None
    report = agent.status()["rollout"]
    assert report["result"] == "promoted" and report["windows"] == N and report["agreement"] == 1.0
    assert report["compared"] == N
    # until the promotion only the current model judged (and could alert); after it, the new one
    ids = [j.score.model_id for j in seen]
    assert ids[: N - 1] == [old] * (N - 1) and ids[-1] == new and set(ids) == {old, new}
    # both models' scores were stored for the shadow period, equal where the weights are equal
    a, b = scores_of(agent, old), scores_of(agent, new)
    both = sorted(set(a) & set(b))
    assert len(both) >= N - 1
    assert all(a[t] == pytest.approx(b[t], rel=1e-9) for t in both)
    doc = json.loads(resources.files("agent").joinpath("schemas", "status.json").read_text())
    jsonschema.validate(report, doc["properties"]["rollout"])
    agent.shutdown()


def test_a_model_that_disagrees_is_refused_and_the_current_one_stays(
    tmp_path: Path, readings: list[Reading]
) -> None:
    agent, model = make_agent(tmp_path)
    old = agent.bundle.model_id
    feed(agent, readings[:600])
    cal = agent.bundle.manifest.calibration
    tiny = {k: v * 1e-6 for k, v in cal.quantiles.items()}  # calls every window anomalous
    new = new_bundle(model, calibration=cal.model_copy(update={"quantiles": tiny}))
    agent.check_model()
    feed(agent, readings[600:900])
    report = agent.status()["rollout"]
    assert report["result"] == "refused" and report["shadow_model_id"] == new
    assert report["agreement"] < 0.5 and report["shadow_anomalous_share"] > 0.9
    assert agent.bundle.model_id == old and agent.pipeline.shadow is None
    # the refused files are not retried every watch interval
    agent.check_model()
    assert agent.pipeline.shadow is None
    agent.shutdown()


def test_a_model_that_fails_in_shadow_is_dropped(tmp_path: Path, readings: list[Reading]) -> None:
    agent, model = make_agent(tmp_path)
    old = agent.bundle.model_id
    feed(agent, readings[:600])
    sc = agent.bundle.manifest.scaler
    # verifies (scale > 0) but overflows float32 on every window: onnxruntime gets inf
    new_bundle(model, scaler=sc.model_copy(update={"scale": [1e-40] * len(sc.scale)}))
    agent.check_model()
    n = agent.pipeline.stats.windows
    feed(agent, readings[600:700])
    report = agent.status()["rollout"]
    assert report["result"] == "failed" and "NaN/inf" in report["error"]
    assert agent.bundle.model_id == old and agent.pipeline.stats.windows > n, "the old model keeps scoring"
    agent.shutdown()


def test_a_model_that_fails_after_promotion_is_rolled_back(tmp_path: Path, readings: list[Reading]) -> None:
    agent, model = make_agent(tmp_path, min_agreement=0.0)
    old = agent.bundle.model_id
    feed(agent, readings[:600])
    sc = agent.bundle.manifest.scaler
    # finite on this pump's temperatures (within ~30 degC of the center), inf beyond: a model that
    # works in shadow and breaks on the first hot reading after its promotion
    scale = [1e-37, *sc.scale[1:]]
    new = new_bundle(model, scaler=sc.model_copy(update={"scale": scale}))
    agent.check_model()
    feed(agent, readings[600:900])
    assert agent.bundle.model_id == new, agent.status()["rollout"]
    hot = readings[900]
    spike = Reading(hot.device, hot.ts, {**hot.values, "temperature": sc.center[0] + 60.0})
    feed(agent, [spike, *readings[901:1000]])
    report = agent.status()["rollout"]
    assert report["result"] == "rolled_back" and report["shadow_model_id"] == new, report
    assert agent.bundle.model_id == old
    n = agent.pipeline.stats.windows
    feed(agent, readings[1000:1100])
    assert agent.pipeline.stats.windows > n and agent.pipeline.scorer.model_id == old
    agent.shutdown()


def test_a_promoted_model_failing_inside_a_batch_payload_is_rolled_back_before_the_next_reading(
    tmp_path: Path, readings: list[Reading]
) -> None:
    """The readings of one batch payload are handled as if each came alone: the reading whose window
    breaks the promoted model rolls it back at once, and the later readings of the same message are
    scored by the previous model (not lost to the same failure)."""
    agent, model = make_agent(tmp_path, min_agreement=0.0)
    old = agent.bundle.model_id
    feed(agent, readings[:600])
    sc = agent.bundle.manifest.scaler
    new = new_bundle(model, scaler=sc.model_copy(update={"scale": [1e-37, *sc.scale[1:]]}))
    agent.check_model()
    feed(agent, readings[600:900])
    assert agent.bundle.model_id == new, agent.status()["rollout"]
    hot = readings[900]
    spike = Reading(hot.device, hot.ts, {**hot.values, "temperature": sc.center[0] + 60.0})
    part = [spike, *readings[901:1000]]
    rows = [
        (900 + k, round(r.ts * 1000), r.values["temperature"], r.values["vibration"], r.values["pressure"])
        for k, r in enumerate(part)
    ]
    msg = RawMessage(
        encode_json_batch(hot.device, rows), "mqtt", f"edgewatch/sensors/{hot.device}/telemetry", time.time()
    )
    seen: list[Judgement] = []
    agent.pipeline._on_judgement = seen.append
    accepted = agent.pipeline.stats.accepted
    agent._handle(msg)  # one message, 100 readings
    assert agent.pipeline.stats.accepted == accepted + len(part)
    report = agent.status()["rollout"]
    assert report["result"] == "rolled_back" and report["shadow_model_id"] == new, report
    assert agent.bundle.model_id == old
    after_spike = [j for j in seen if j.score.end_ts >= spike.ts]
    assert after_spike and {j.score.model_id for j in after_spike} == {old}, "later readings lost"
    agent.shutdown()


def test_a_restart_during_the_shadow_resumes_with_the_model_in_use(
    tmp_path: Path, readings: list[Reading]
) -> None:
    """The candidate replaced the files in [model] path; the state directory's copy of the model in
    use lets a restart (power cut, upgrade) come back with it, and the candidate shadows again."""
    agent, model = make_agent(tmp_path)
    old = agent.bundle.model_id
    feed(agent, readings[:600])
    new = new_bundle(model)
    agent.check_model()
    feed(agent, readings[600:650])  # a few shadow windows, no promotion yet
    assert agent.pipeline.shadow is not None and agent.bundle.model_id == old
    agent.shutdown()

    again = Agent(load_config(tmp_path / "ew.toml"), sources=[])
    assert again.bundle.model_id == old, "the candidate must not take over by a restart"
    assert again.pipeline.shadow is not None and again.pipeline.shadow.model_id == new
    feed(again, readings[650:1000])
    assert again.bundle.model_id == new and again.status()["rollout"]["result"] == "promoted"
    again.shutdown()

    # promoted: the next restart starts with it, and there is nothing left to shadow
    third = Agent(load_config(tmp_path / "ew.toml"), sources=[])
    assert third.bundle.model_id == new and third.pipeline.shadow is None
    third.shutdown()
