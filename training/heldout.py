"""Evaluate a bundle (and the Isolation Forest baseline) on a held-out labelled recording.

Streaming view, as on the gateway: windows every `stride` samples, each judged when its last sample
arrives; its decision holds for the rows until the next window ends. Events are machine faults (the
`fault` label, degrading through failed until repair); lead time runs to the first `failed` row.
Sensor faults are not machine events: alerts during them count as false alerts, and are also
reported separately, because the health monitor (not the model) is meant to raise them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.evaluate import Evaluation, evaluate, runs
from agent.score import Scorer
from training.data import GridSeries, all_window_starts, cut_windows, read_file, to_grid


@dataclass
class ScoredGrid:
    grid: GridSeries
    starts: np.ndarray  # window start rows
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # detector name -> score per window


@dataclass
class DetectorResult:
    name: str
    threshold: float
    evaluation: Evaluation
    device_days: float
    alerts_in_sensor_faults: int
    per_fault: dict[str, dict[str, float]]

    @property
    def false_alerts_per_device_day(self) -> float:
        return self.evaluation.event.n_false_alerts / self.device_days if self.device_days else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "device_days": self.device_days,
            "false_alerts_per_device_day": self.false_alerts_per_device_day,
            "alerts_in_sensor_faults": self.alerts_in_sensor_faults,
            "per_fault": self.per_fault,
            **self.evaluation.to_dict(),
        }


def load_grids(
    paths: list[str | Path], channels: list[str], period: float, max_gap: float
) -> list[GridSeries]:
    grids = []
    for p in paths:
        series, _ = read_file(p, channels)
        grids.extend(to_grid(s, period, max_gap) for s in series)
    return grids


def score_grids(grids: list[GridSeries], scorer: Scorer) -> list[ScoredGrid]:
    """Autoencoder scores of every NaN-free window (the agent's stride)."""
    out = []
    for g in grids:
        starts = all_window_starts(g, scorer.window, scorer.stride)
        x = cut_windows(g.values, starts, scorer.window)
        err = (
            np.concatenate([scorer.errors(x[i : i + 2048])[0] for i in range(0, len(x), 2048)])
            if len(x)
            else np.empty(0)
        )
        out.append(ScoredGrid(grid=g, starts=starts, scores={"lstm_ae": err}))
    return out


def row_predictions(
    n_rows: int, starts: np.ndarray, window: int, stride: int, alarm: np.ndarray
) -> np.ndarray:
    """Each window's decision from its last row until the next window ends (at most `stride` rows)."""
    pred = np.zeros(n_rows, dtype=bool)
    ends = starts + window - 1
    for e in ends[alarm]:
        pred[e : min(e + stride, n_rows)] = True
    return pred


def consecutive(alarm: np.ndarray, k: int) -> np.ndarray:
    """True where the last `k` window decisions were all true (simple debouncing)."""
    if k <= 1:
        return alarm
    c = np.convolve(alarm.astype(np.int32), np.ones(k, dtype=np.int32))[: alarm.size]
    return c >= k


def evaluate_detector(
    scored: list[ScoredGrid], name: str, threshold: float, window: int, stride: int, k: int = 1
) -> DetectorResult:
    total: Evaluation | None = None
    seconds = 0.0
    in_sensor = 0
    per_fault: dict[str, list[tuple[bool, float]]] = {}
    for sg in scored:
        g = sg.grid
        alarm = consecutive(sg.scores[name] > threshold, k)
        pred = row_predictions(g.ts.size, sg.starts, window, stride, alarm)
        labels = g.fault != ""
        failure = g.state == "failed"
        ev = evaluate(labels, pred, g.ts, failure)
        total = ev if total is None else total.merge(ev)
        if g.ts.size > 1:
            seconds += float(g.ts[-1] - g.ts[0]) + float(np.median(np.diff(g.ts)))
        sensor = g.sensor_fault != ""
        for s, e in runs(pred):
            if not labels[s:e].any() and sensor[s:e].any():
                in_sensor += 1
        for s, e in runs(labels):
            hit = np.flatnonzero(pred[s:e])
            fail = np.flatnonzero(failure[s:e])
            lead = float(g.ts[s + fail[0]] - g.ts[s + hit[0]]) if hit.size and fail.size else float("nan")
            per_fault.setdefault(str(g.fault[s]), []).append((bool(hit.size), lead))
    assert total is not None
    summary = {
        kind: {
            "events": float(len(v)),
            "detected": float(sum(d for d, _ in v)),
            "median_lead_s": float(np.nanmedian([lead for _, lead in v]))
            if any(d for d, _ in v)
            else float("nan"),
        }
        for kind, v in sorted(per_fault.items())
    }
    return DetectorResult(
        name=name,
        threshold=threshold,
        evaluation=total,
        device_days=seconds / 86400.0,
        alerts_in_sensor_faults=in_sensor,
        per_fault=summary,
    )
