"""Evaluation metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.evaluate import evaluate, event_metrics, point_metrics, runs

# index:        0  1  2  3  4  5  6  7  8  9 10 11
LABELS = np.array([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
PREDS = np.array([1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1], dtype=bool)


def test_runs() -> None:
    assert runs(LABELS) == [(2, 5), (8, 10)]
    assert runs(PREDS) == [(0, 1), (3, 6), (11, 12)]
    assert runs(np.zeros(0, dtype=bool)) == []


def test_point_metrics_by_hand() -> None:
    m = point_metrics(LABELS, PREDS)
    # TP: 3, 4 -> 2. FP: 0, 5, 11 -> 3. FN: 2, 8, 9 -> 3. TN: 1, 6, 7, 10 -> 4.
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 3, 3, 4)
    assert m.precision == pytest.approx(2 / 5)
    assert m.recall == pytest.approx(2 / 5)
    assert m.f1 == pytest.approx(2 * 2 / (2 * 2 + 3 + 3))
    assert m.far == pytest.approx(3 / 7)
    assert m.mar == pytest.approx(3 / 5)


def test_event_metrics_by_hand() -> None:
    ts = 100.0 + 10.0 * np.arange(12)  # one row every 10 s
    failure = np.zeros(12, dtype=bool)
    failure[4] = True  # first event ends in a failure at t = 140
    failure[9] = True  # second event fails too, but is never detected
    m = event_metrics(LABELS, PREDS, ts, failure)
    assert m.n_events == 2 and m.n_detected == 1 and m.recall == 0.5
    # spans (0,1) and (11,12) overlap no event; (3,6) overlaps the first event
    assert m.n_alert_spans == 3 and m.n_false_alerts == 2
    assert m.precision == pytest.approx(1 / 3)
    assert m.time_to_detect == [10.0]  # first alert inside at t=130, event starts at t=120
    assert m.lead_times == [10.0]  # failure at 140 - first alert at 130
    assert m.n_failures == 2
    assert m.median_lead_time == 10.0


def test_alert_starting_before_event_detects_at_event_start() -> None:
    y = np.array([0, 0, 1, 1, 0], dtype=bool)
    p = np.array([0, 1, 1, 0, 0], dtype=bool)
    m = event_metrics(y, p)
    assert m.n_detected == 1 and m.time_to_detect == [0.0] and m.n_false_alerts == 0


def test_no_events_and_no_alerts_give_nan_not_zero() -> None:
    e = evaluate(np.zeros(5, dtype=bool), np.zeros(5, dtype=bool))
    assert math.isnan(e.event.recall) and math.isnan(e.point.precision)
    assert e.point.far == 0.0 and e.point.tn == 5


def test_merge_sums_devices_without_joining_runs() -> None:
    a = evaluate(np.array([0, 1], dtype=bool), np.array([0, 1], dtype=bool))
    b = evaluate(np.array([1, 0], dtype=bool), np.array([0, 1], dtype=bool))
    m = a.merge(b)
    assert m.event.n_events == 2 and m.event.n_detected == 1 and m.event.n_false_alerts == 1
    assert (m.point.tp, m.point.fp, m.point.fn, m.point.tn) == (1, 1, 1, 1)
    d = m.to_dict()
    assert d["event"]["recall"] == 0.5 and d["point"]["f1"] == 0.5


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="equal length"):
        evaluate(np.zeros(3, dtype=bool), np.zeros(4, dtype=bool))
