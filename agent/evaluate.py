"""Detection metrics shared by training reports, replay and benchmarks (numpy only).

Point-wise: precision, recall, F1, FAR (false alarm rate = FP / (FP + TN)) and MAR (missed alarm
rate = FN / (FN + TP)), as fractions. Event-wise: an event is a contiguous run of true labels; it is
found when an alert span (contiguous run of true predictions) overlaps it; an alert span that overlaps
no event is a false alert. Timing: time to detect = first alert inside the event - event start; lead
time = failure time - that first alert, for events that contain a failure. Point-adjusted F1 is
deliberately absent: it lets random scores look excellent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open (start, stop) index ranges where `mask` is true."""
    m = np.asarray(mask, dtype=bool).astype(np.int8)
    if m.size == 0:
        return []
    edges = np.diff(np.concatenate(([0], m, [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


@dataclass(slots=True)
class PointMetrics:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def far(self) -> float:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def mar(self) -> float:
        return _ratio(self.fn, self.fn + self.tp)

    def to_dict(self) -> dict[str, float]:
        d: dict[str, float] = dict(asdict(self))
        d.update(precision=self.precision, recall=self.recall, f1=self.f1, far=self.far, mar=self.mar)
        return d


@dataclass(slots=True)
class EventMetrics:
    n_events: int = 0
    n_detected: int = 0
    n_alert_spans: int = 0
    n_false_alerts: int = 0
    time_to_detect: list[float] = field(default_factory=list)  # per detected event, seconds
    lead_times: list[float] = field(default_factory=list)  # per detected event with a failure, seconds
    n_failures: int = 0  # events that contain a failure

    @property
    def recall(self) -> float:
        return _ratio(self.n_detected, self.n_events)

    @property
    def precision(self) -> float:
        return _ratio(self.n_alert_spans - self.n_false_alerts, self.n_alert_spans)

    @property
    def median_time_to_detect(self) -> float:
        return float(np.median(self.time_to_detect)) if self.time_to_detect else float("nan")

    @property
    def median_lead_time(self) -> float:
        return float(np.median(self.lead_times)) if self.lead_times else float("nan")

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = dict(asdict(self))
        d.update(
            recall=self.recall,
            precision=self.precision,
            median_time_to_detect=self.median_time_to_detect,
            median_lead_time=self.median_lead_time,
        )
        return d


@dataclass(slots=True)
class Evaluation:
    point: PointMetrics
    event: EventMetrics

    def to_dict(self) -> dict[str, object]:
        return {"point": self.point.to_dict(), "event": self.event.to_dict()}

    def merge(self, other: Evaluation) -> Evaluation:
        """Sum counts of two evaluations (e.g. two devices) without joining their runs."""
        p, q = self.point, other.point
        e, f = self.event, other.event
        return Evaluation(
            PointMetrics(p.tp + q.tp, p.fp + q.fp, p.fn + q.fn, p.tn + q.tn),
            EventMetrics(
                e.n_events + f.n_events,
                e.n_detected + f.n_detected,
                e.n_alert_spans + f.n_alert_spans,
                e.n_false_alerts + f.n_false_alerts,
                e.time_to_detect + f.time_to_detect,
                e.lead_times + f.lead_times,
                e.n_failures + f.n_failures,
            ),
        )


def _check(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(preds, dtype=bool)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels and predictions must be 1-D of equal length, got {y.shape} and {p.shape}")
    return y, p


def point_metrics(labels: np.ndarray, preds: np.ndarray) -> PointMetrics:
    y, p = _check(labels, preds)
    return PointMetrics(
        tp=int(np.sum(y & p)), fp=int(np.sum(~y & p)), fn=int(np.sum(y & ~p)), tn=int(np.sum(~y & ~p))
    )


def event_metrics(
    labels: np.ndarray,
    preds: np.ndarray,
    ts: np.ndarray | None = None,
    failure: np.ndarray | None = None,
) -> EventMetrics:
    """Event-wise metrics; `ts` (seconds, default row index) for timings, `failure` marks failed rows."""
    y, p = _check(labels, preds)
    t = np.arange(y.size, dtype=np.float64) if ts is None else np.asarray(ts, dtype=np.float64)
    f = np.zeros(y.size, dtype=bool) if failure is None else np.asarray(failure, dtype=bool)
    if t.shape != y.shape or f.shape != y.shape:
        raise ValueError("ts and failure must match labels in length")
    events = runs(y)
    spans = runs(p)
    out = EventMetrics(n_events=len(events), n_alert_spans=len(spans))
    for s, e in spans:
        if not y[s:e].any():
            out.n_false_alerts += 1
    for s, e in events:
        fail_idx = np.flatnonzero(f[s:e])
        if fail_idx.size:
            out.n_failures += 1
        hit = np.flatnonzero(p[s:e])
        if hit.size == 0:
            continue
        out.n_detected += 1
        first = t[s + hit[0]]
        out.time_to_detect.append(float(first - t[s]))
        if fail_idx.size:
            out.lead_times.append(float(t[s + fail_idx[0]] - first))
    return out


def evaluate(
    labels: np.ndarray,
    preds: np.ndarray,
    ts: np.ndarray | None = None,
    failure: np.ndarray | None = None,
) -> Evaluation:
    """Point-wise and event-wise metrics for one contiguous series (merge() across devices)."""
    return Evaluation(point_metrics(labels, preds), event_metrics(labels, preds, ts, failure))
