"""Anomaly threshold per device: a rolling percentile of recent normal scores, anchored to calibration.

Stage: Score -> Judgement. Thresholders are river-style wrappers: `classify` judges, `learn_one` feeds
the baseline. The bundle's calibration quantiles give the starting point and hard bounds, so the
threshold is usable from the first window and can neither sink into noise nor be dragged up by a slow
degradation that would then hide itself.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np
import sqlite_utils
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent import metrics
from agent.db import read_state, state_row
from agent.types import Judgement, Score

log = logging.getLogger(__name__)

_KEY_PREFIX = "threshold:"

CalibrationQuantile = Literal["p50", "p90", "p99", "p99.5", "p99.9"]


class ThresholdConfig(BaseModel):
    """[threshold] settings: how the per-device anomaly threshold is set and adapted."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["rolling_median", "rolling_percentile", "fixed"] = Field(
        "rolling_median",
        description="rolling_median: each device's recent median score times the calibrated "
        "quantile/p50 ratio (a fault must fill half the history to move it); rolling_percentile: the "
        "rolling quantile of recent normal scores (a slow degradation can drag it up); fixed keeps the "
        "calibration start value forever (to compare, or on a gateway with too little history)",
    )
    quantile: float = Field(
        0.99,
        gt=0.5,
        lt=1.0,
        description="quantile of the device's normal scores the threshold targets (0.99 = q99); "
        "rolling_median needs a calibrated one: 0.9, 0.99, 0.995 or 0.999",
    )
    history: int = Field(
        2000, ge=10, le=1_000_000, description="normal scores kept per device in the rolling baseline"
    )
    margin: float = Field(
        1.5,
        ge=1.0,
        description="rolling_percentile only: threshold = margin x rolling quantile (cf. SKAB's UCL = "
        "1.5 x q99); rolling_median targets the calibrated quantile itself",
    )
    min_history: int = Field(
        200,
        ge=1,
        description="normal scores needed before the rolling value is trusted; until then the "
        "calibration start value is used",
    )
    start_quantile: CalibrationQuantile = Field(
        "p99.9", description="calibration quantile the threshold starts from (before min_history)"
    )
    floor_quantile: CalibrationQuantile = Field(
        "p99", description="calibration quantile that, times floor_factor, bounds the threshold from below"
    )
    floor_factor: float = Field(
        1.0, gt=0.0, description="floor = floor_factor x calibration[floor_quantile]: never sink into noise"
    )
    ceiling_factor: float = Field(
        2.0,
        gt=0.0,
        description="ceiling = ceiling_factor x calibration p99.9: a slow degradation that leaks into the "
        "baseline cannot drag the threshold above this and hide itself",
    )
    persist_every_s: float = Field(
        5.0, ge=0.0, description="save the baseline to SQLite at most this often (and on save())"
    )
    value: float | None = Field(
        None,
        gt=0.0,
        description="kind = fixed only: this absolute threshold instead of the calibration start value "
        "(e.g. one chosen on a backtest with `edgewatch replay`)",
    )
    ewma_alpha: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="weight of the newest window score in a per-device exponentially weighted mean that "
        "the threshold judges instead of the raw score (1 = no smoothing). Smoothing trades detection delay "
        "for fewer single-window false alarms; the calibration quantiles are of raw scores, so a smoothed "
        "score sits lower against them. The mean restarts from the next score after a restart",
    )

    @model_validator(mode="after")
    def _value_needs_fixed(self) -> ThresholdConfig:
        if self.value is not None and self.kind != "fixed":
            raise ValueError(f"value is only used with kind = 'fixed' (kind is {self.kind!r})")
        return self


class Thresholder(Protocol):
    """What the pipeline needs from any thresholder (the conformance tests hold every class to it)."""

    def classify(self, score: Score) -> Judgement: ...
    def learn_one(self, judgement: Judgement) -> None: ...
    def threshold(self, device: str) -> float: ...
    def save(self) -> None: ...
    def reset(self, device: str) -> None: ...


def _bounds(config: ThresholdConfig, calibration: dict[str, float]) -> tuple[float, float, float]:
    """(start, floor, ceiling) from the bundle's calibration quantiles; fail clearly on a bad manifest."""
    needed = {config.start_quantile, config.floor_quantile, "p99.9"}
    missing = sorted(needed - calibration.keys())
    if missing:
        raise ValueError(f"calibration quantiles missing {missing} (have {sorted(calibration)})")
    for key in needed:
        value = calibration[key]
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = math.nan
        # a zero floor is harmless; a zero start or ceiling would flag every window
        zero_ok = key not in (config.start_quantile, "p99.9")
        if not (math.isfinite(v) and (v > 0 or (v == 0 and zero_ok))):
            raise ValueError(f"calibration quantile {key} must be a positive finite number, got {value!r}")
    floor = config.floor_factor * float(calibration[config.floor_quantile])
    ceiling = config.ceiling_factor * float(calibration["p99.9"])
    if floor > ceiling:
        raise ValueError(
            f"threshold floor {floor:g} ({config.floor_factor} x {config.floor_quantile}) is above the "
            f"ceiling {ceiling:g} ({config.ceiling_factor} x p99.9): lower floor_factor or raise "
            "ceiling_factor"
        )
    start = min(max(float(calibration[config.start_quantile]), floor), ceiling)
    return start, floor, ceiling


def _quantile(values: np.ndarray, q: float) -> float:
    """np.quantile's default (linear) method via a partial sort of the two order statistics needed.

    np.quantile sorts more than it needs: this is several times faster on a 2,000-score ring (~10 µs),
    which matters because it runs once per window.
    """
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    part = np.partition(values, [lo, hi])
    a, b, t = float(part[lo]), float(part[hi]), pos - lo
    # the same interpolation numpy uses, so results match np.quantile exactly
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def _check_score(score: Score) -> None:
    if not math.isfinite(score.error):
        raise ValueError(
            f"non-finite score {score.error!r} for {score.device} at {score.end_ts}: windows with gaps "
            "or NaN must not be scored"
        )


@dataclass
class _Baseline:
    """One device's ring of recent normal scores, plus the threshold derived from it."""

    ring: np.ndarray
    count: int = 0  # filled slots (<= len(ring))
    pos: int = 0  # next slot to write
    model_id: str | None = None
    relearn: bool = False  # after reset(): learn a new normal under the ceiling
    cached: float | None = None  # threshold, recomputed lazily after learn_one
    dirty: bool = False  # changed since last persisted

    def chronological(self) -> np.ndarray:
        if self.count < len(self.ring):
            return self.ring[: self.count].copy()
        return np.roll(self.ring, -self.pos)


class RollingPercentile:
    """threshold = clip(margin x rolling quantile of the last N normal scores, floor, ceiling), per device.

    Until min_history normal scores are seen the calibration start value is used. Only windows judged
    normal enter the baseline, so an anomaly cannot raise the bar it is measured against (the telemanom
    failure mode of a sliding threshold jumping when an anomaly enters its window).
    """

    def __init__(
        self,
        config: ThresholdConfig,
        calibration: dict[str, float],
        db: sqlite_utils.Database | None = None,
        model_id: str | None = None,
    ) -> None:
        """`model_id`: the bundle these calibration figures belong to; saved baselines learnt on another
        model are not restored (their error scale differs). Scores carry their model id too, so a baseline
        also starts over if scores from another model arrive."""
        self.config = config
        self.start, self.floor, self.ceiling = _bounds(config, calibration)
        self.db = db
        self.model_id = model_id
        self._devices: dict[str, _Baseline] = {}
        self._last_persist = time.monotonic()
        if db is not None:
            self._restore()

    # -- pipeline API -------------------------------------------------------------------------------
    def classify(self, score: Score) -> Judgement:
        _check_score(score)
        base = self._baseline(score.device, score.model_id)
        thr = self._threshold(base)
        metrics.THRESHOLD.labels(score.device).set(thr)
        return Judgement(score=score, threshold=thr, anomalous=bool(score.error > thr))

    def learn_one(self, judgement: Judgement) -> None:
        """Add a normal score to its device's baseline; anomalous ones are left out on purpose."""
        if judgement.anomalous:
            return
        score = judgement.score
        _check_score(score)
        base = self._baseline(score.device, score.model_id)
        base.ring[base.pos] = score.error
        base.pos = (base.pos + 1) % len(base.ring)
        base.count = min(base.count + 1, len(base.ring))
        if base.relearn and base.count >= self.config.min_history:
            base.relearn = False
        base.cached = None
        base.dirty = True
        if self.db is not None and time.monotonic() - self._last_persist >= self.config.persist_every_s:
            try:
                self.save()
            except sqlite3.Error as exc:
                # the baseline stays in memory (dirty) and the next save retries
                metrics.DB_ERRORS.labels("threshold_state").inc()
                log.error("could not persist threshold state (will retry): %s", exc)

    def threshold(self, device: str) -> float:
        base = self._devices.get(device)
        return self.start if base is None else self._threshold(base)

    def history(self, device: str) -> np.ndarray:
        """The device's baseline, oldest first (for diagnostics and tests)."""
        base = self._devices.get(device)
        return np.empty(0) if base is None else base.chronological()

    def reset(self, device: str) -> None:
        """Accept a new normal: forget the baseline and relearn it.

        While relearning (until min_history normal scores), the ceiling is the threshold, so scores up to
        the ceiling form the new baseline instead of all being judged anomalous against the old one;
        only gross anomalies above the ceiling still alert.
        """
        self._devices[device] = _Baseline(
            ring=np.zeros(self.config.history),
            relearn=True,
            dirty=True,
            model_id=self._devices[device].model_id if device in self._devices else None,
        )
        self.save()

    def save(self) -> None:
        """Persist every changed baseline in one transaction (called on shutdown and every few seconds)."""
        self._last_persist = time.monotonic()
        if self.db is None:
            return
        dirty = [(d, b) for d, b in self._devices.items() if b.dirty]
        if not dirty:
            return
        rows = [
            state_row(
                f"{_KEY_PREFIX}{device}",
                {
                    "v": 1,
                    "model_id": base.model_id,
                    "relearn": base.relearn,
                    "history": self.config.history,
                    "scores": base.chronological().tolist(),
                },
            )
            for device, base in dirty
        ]
        with self.db.atomic():
            self.db["state"].upsert_all(rows, pk="key")
        for _, base in dirty:
            base.dirty = False

    # -- internals ----------------------------------------------------------------------------------
    def _baseline(self, device: str, model_id: str) -> _Baseline:
        base = self._devices.get(device)
        if base is None or (base.model_id is not None and base.model_id != model_id):
            if base is not None:
                log.warning(
                    "threshold baseline of %s was learnt on model %s; starting over for model %s",
                    device,
                    base.model_id,
                    model_id,
                )
            base = _Baseline(ring=np.zeros(self.config.history), model_id=model_id, dirty=True)
            self._devices[device] = base
        elif base.model_id is None:
            base.model_id = model_id
        return base

    def _threshold(self, base: _Baseline) -> float:
        if base.cached is None:
            if base.relearn:
                base.cached = self.ceiling
            elif base.count < self.config.min_history:
                base.cached = self.start
            else:
                q = _quantile(base.ring[: base.count], self.config.quantile)
                base.cached = min(max(self.config.margin * q, self.floor), self.ceiling)
        return base.cached

    def _restore(self) -> None:
        assert self.db is not None
        for device, value_json in read_state(self.db, _KEY_PREFIX):
            try:
                state = json.loads(value_json)
                scores = np.asarray(state["scores"], dtype=np.float64)[-self.config.history :]
            except (ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable threshold state for %s: %s", device, exc)
                continue
            if self.model_id is not None and state.get("model_id") != self.model_id:
                log.info(
                    "not restoring the threshold baseline of %s: learnt on model %s, now %s",
                    device,
                    state.get("model_id"),
                    self.model_id,
                )
                continue
            base = _Baseline(ring=np.zeros(self.config.history), model_id=state.get("model_id"))
            base.ring[: len(scores)] = scores
            base.count = len(scores)
            base.pos = base.count % self.config.history
            base.relearn = bool(state.get("relearn", False))
            self._devices[device] = base


_CALIBRATION_KEY = {0.9: "p90", 0.99: "p99", 0.995: "p99.5", 0.999: "p99.9"}


class RollingMedian(RollingPercentile):
    """threshold = clip(rolling median x calibration[q] / calibration[p50], floor, ceiling).

    The same target as RollingPercentile (the `quantile` q of this device's normal scores), estimated
    differently: the shape of the normal error distribution (its heavy start/stop tail, q99/p50 ~ 10)
    comes from calibration, and only its level is learnt per device, through the median. A median does
    not ratchet: windows just under the threshold during a slow degradation move it only once they are
    more than half of the history, whereas they lift a rolling q99 as soon as 1 % of the history is
    degraded (measured: a cavitation run whose q99 threshold rose from 0.127 to ~0.3 and hid the fault).
    No margin: the estimate is not the top order statistic of the device's own scores, and replays of
    held-out days were best without one (docs/detection.md); k-of-n alerting absorbs the 1 % above it.
    """

    def __init__(
        self,
        config: ThresholdConfig,
        calibration: dict[str, float],
        db: sqlite_utils.Database | None = None,
        model_id: str | None = None,
    ) -> None:
        key = _CALIBRATION_KEY.get(round(config.quantile, 6))
        if key is None:
            raise ValueError(
                f"rolling_median needs quantile in {sorted(_CALIBRATION_KEY)} (a calibrated quantile), "
                f"got {config.quantile}"
            )
        super().__init__(config, calibration, db, model_id)
        values = [calibration.get(k) for k in ("p50", key)]
        if not all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"rolling_median needs positive finite calibration p50 and {key}, got {values}")
        self.ratio = float(calibration[key]) / float(calibration["p50"])

    def _threshold(self, base: _Baseline) -> float:
        if base.cached is None and not base.relearn and base.count >= self.config.min_history:
            median = _quantile(base.ring[: base.count], 0.5)
            base.cached = min(max(self.ratio * median, self.floor), self.ceiling)
        return super()._threshold(base)


class FixedThreshold:
    """The calibration start value (or `value`), forever: a baseline to compare against, a safe fallback,
    and the threshold chosen on a backtest."""

    def __init__(
        self,
        config: ThresholdConfig,
        calibration: dict[str, float],
        db: sqlite_utils.Database | None = None,
        model_id: str | None = None,
    ) -> None:
        self.config = config
        self.start, self.floor, self.ceiling = _bounds(config, calibration)
        if config.value is not None:
            self.start = config.value
        self.model_id = model_id

    def classify(self, score: Score) -> Judgement:
        _check_score(score)
        metrics.THRESHOLD.labels(score.device).set(self.start)
        return Judgement(score=score, threshold=self.start, anomalous=bool(score.error > self.start))

    def learn_one(self, judgement: Judgement) -> None:
        """Nothing to learn: the threshold does not move."""

    def threshold(self, device: str) -> float:
        return self.start

    def save(self) -> None:
        """Nothing to save: the threshold is a function of the bundle."""

    def reset(self, device: str) -> None:
        """Nothing to reset."""


class Smoothed:
    """Wraps a thresholder so it judges each device's EWMA of the window scores, not the raw score.

    The judgement carries the smoothed score (alerts report what was judged); the mean starts at the
    device's first score, like `training.skab`'s offline decision stage did before it moved here.
    """

    def __init__(self, inner: Thresholder, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {alpha}")
        self.inner = inner
        self.alpha = alpha
        self._mean: dict[str, float] = {}

    def classify(self, score: Score) -> Judgement:
        _check_score(score)
        prev = self._mean.get(score.device, score.error)
        mean = self.alpha * score.error + (1.0 - self.alpha) * prev
        self._mean[score.device] = mean
        return self.inner.classify(replace(score, error=mean))

    def learn_one(self, judgement: Judgement) -> None:
        self.inner.learn_one(judgement)

    def threshold(self, device: str) -> float:
        return self.inner.threshold(device)

    def save(self) -> None:
        self.inner.save()

    def reset(self, device: str) -> None:
        self._mean.pop(device, None)
        self.inner.reset(device)


def make_thresholder(
    config: ThresholdConfig,
    calibration: dict[str, float],
    db: sqlite_utils.Database | None = None,
    model_id: str | None = None,
) -> Thresholder:
    """The thresholder named by config.kind (what the service should call instead of a class)."""
    cls = {"rolling_median": RollingMedian, "rolling_percentile": RollingPercentile, "fixed": FixedThreshold}[
        config.kind
    ]
    inner: Thresholder = cls(config, calibration, db, model_id)
    return inner if config.ewma_alpha >= 1.0 else Smoothed(inner, config.ewma_alpha)
