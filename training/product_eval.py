"""Held-out evaluation through the PRODUCT's decision path: replay -> threshold -> k-of-n alerts.

What a user gets is not "error > p99.9, each window alone" but the agent's rolling threshold and
alert state machine. So the model is judged by replaying labelled recordings through
`agent.pipeline.build_pipeline` and scoring the alert spans with `agent.report.evaluate_replay`.

Any other detector (the Isolation Forest baseline) is put through the same rule by feeding its window
scores to the agent's own `Thresholder` and `AlertManager` classes, with the pipeline's one extra
rule (no learning while an alert is open), on exactly the windows the pipeline scored.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.alert import AlertManager
from agent.bundle import Bundle
from agent.db import open_db
from agent.evaluate import runs
from agent.pipeline import StageSettings, build_pipeline
from agent.recording import Recording
from agent.replay import ReplayResult, replay
from agent.report import alerted_rows, evaluate_replay
from agent.threshold import make_thresholder
from agent.types import Event, Score, Window


@dataclass
class Captured:
    """One product replay, plus the windows it scored (in scoring order) for other detectors."""

    result: ReplayResult
    windows: list[Window]


class _TeeScorer:
    """Delegates to the pipeline's scorer and keeps every window it was asked to score."""

    def __init__(self, inner: Any, sink: list[Window]) -> None:
        self._inner = inner
        self._sink = sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def score(self, windows: list[Window]) -> list[Score]:
        self._sink.extend(windows)
        return self._inner.score(windows)


def replay_product(
    bundle: Bundle,
    recordings: Sequence[Recording],
    settings: StageSettings | None = None,
    keep_windows: bool = False,
) -> Captured:
    """Replay recordings through build_pipeline (a fresh temporary database) exactly as `edgewatch replay`."""
    settings = settings or StageSettings()
    windows: list[Window] = []
    with tempfile.TemporaryDirectory(prefix="edgewatch-eval-") as tmp:
        db = open_db(Path(tmp) / "replay.db")
        try:

            def factory(emit: Callable[[Event], None], on_judgement: Any) -> Any:
                pipe = build_pipeline(settings, bundle, db, emit, on_judgement=on_judgement)
                if keep_windows:
                    pipe.scorer = _TeeScorer(pipe.scorer, windows)  # type: ignore[assignment]
                return pipe

            result = replay(recordings, factory)
        finally:
            db.conn.close()
    return Captured(result=result, windows=windows)


def decide(
    scores: Sequence[Score],
    recordings: Sequence[Recording],
    calibration: dict[str, float],
    settings: StageSettings | None = None,
    model_id: str = "offline",
    norms: dict[str, float] | None = None,
) -> ReplayResult:
    """Run scores (any detector's, in time order per device) through the agent's threshold and alert
    classes with the pipeline's rule, without SQLite; returns a ReplayResult for evaluate_replay."""
    settings = settings or StageSettings()
    thr = make_thresholder(settings.threshold, calibration, None, model_id=model_id)
    alerts = AlertManager(settings.alerts, settings.gateway_id, None, channel_norm=norms)
    out = ReplayResult(recordings=list(recordings))
    for s in scores:
        j = thr.classify(s)
        if alerts.open_alert(s.device) is None:
            thr.learn_one(j)
        out.judgements.append(j)
        out.events.extend(alerts.update(j))
    return out


def rescore(scores: Sequence[Score], values: np.ndarray, model_id: str) -> list[Score]:
    """The same windows with another detector's scores (channel shares kept: attribution is not judged)."""
    return [
        replace(s, error=float(v), model_id=model_id) for s, v in zip(scores, values.tolist(), strict=True)
    ]


def summarise(result: ReplayResult) -> dict[str, Any]:
    """evaluate_replay's metrics plus what a maintenance team asks: false alerts per device-day, per fault."""
    total, _ = evaluate_replay(result)
    spans = result.alert_spans()
    seconds = 0.0
    in_sensor = 0
    per_fault: dict[str, list[tuple[bool, float]]] = {}
    for rec in result.recordings:
        if len(rec) > 1:
            seconds += float(rec.ts[-1] - rec.ts[0]) + float(np.median(np.diff(rec.ts)))
        truth = rec.anomalous()
        if truth is None:
            continue
        pred = alerted_rows(rec, spans.get(rec.device, []))
        sensor = rec.labels.get("sensor_fault", np.full(len(rec), "")) != ""
        failed = rec.labels.get("machine_state", np.full(len(rec), "")) == "failed"
        fault = rec.labels.get("fault", np.full(len(rec), ""))
        for s, e in runs(pred):
            if not truth[s:e].any() and sensor[s:e].any():
                in_sensor += 1
        for s, e in runs(truth):
            hit = np.flatnonzero(pred[s:e])
            fail = np.flatnonzero(failed[s:e])
            lead = float(rec.ts[s + fail[0]] - rec.ts[s + hit[0]]) if hit.size and fail.size else float("nan")
            kind = next((str(f) for f in fault[s:e] if f), "unknown")
            per_fault.setdefault(kind, []).append((bool(hit.size), lead))
    days = seconds / 86400.0
    out: dict[str, Any] = {"device_days": days, "alerts_in_sensor_faults": in_sensor}
    if total is None:
        out["false_alerts_per_device_day"] = (
            sum(len(v) for v in spans.values()) / days if days else float("nan")
        )
        return out
    out.update(total.to_dict())
    out["false_alerts_per_device_day"] = total.event.n_false_alerts / days if days else float("nan")
    out["per_fault"] = {
        k: {
            "events": len(v),
            "detected": sum(d for d, _ in v),
            "median_lead_s": float(np.nanmedian([x for _, x in v])) if any(d for d, _ in v) else float("nan"),
        }
        for k, v in sorted(per_fault.items())
    }
    return out
