"""Anomaly threshold per device: a rolling percentile of recent normal scores, anchored to calibration.

Stage: Score -> Judgement. Thresholders are river-style wrappers: `classify` judges, `learn_one` feeds
the baseline. The bundle's calibration quantiles give the starting point and hard bounds, so the
threshold is usable from the first window and can neither sink into noise nor be dragged up by a slow
degradation that would then hide itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CalibrationQuantile = Literal["p50", "p90", "p99", "p99.5", "p99.9"]


class ThresholdConfig(BaseModel):
    """[threshold] settings: how the per-device anomaly threshold is set and adapted."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["rolling_percentile", "fixed"] = Field(
        "rolling_percentile",
        description="rolling_percentile adapts to each device's recent normal scores; fixed keeps the "
        "calibration start value forever (useful to compare, or on a gateway with too little history)",
    )
    quantile: float = Field(
        0.99, gt=0.5, lt=1.0, description="quantile of the rolling normal-score history (0.99 = q99)"
    )
    history: int = Field(
        2000, ge=10, le=1_000_000, description="normal scores kept per device in the rolling baseline"
    )
    margin: float = Field(
        1.5, ge=1.0, description="threshold = margin x rolling quantile (cf. SKAB's UCL = 1.5 x q99)"
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
