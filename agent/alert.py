"""Alerts from judgements: k-of-n to open, hysteresis and m windows to resolve, cooldown, attribution.

Stage: Judgement -> alert Events (open / update / resolve). Alert ids are deterministic from device,
opened_ts and model_id, so a replay of the same data produces the same ids as the live run.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AlertConfig(BaseModel):
    """[alert] settings: when an anomaly becomes an alert, how often it is updated, when it resolves."""

    model_config = ConfigDict(extra="forbid")

    open_k: int = Field(
        3, ge=1, description="anomalous windows among the last open_n needed to open an alert"
    )
    open_n: int = Field(5, ge=1, description="size of the k-of-n window used to open an alert")
    recovery_ratio: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="recovery threshold = recovery_ratio x threshold; scores between it and the threshold "
        "keep an alert open (hysteresis against flapping)",
    )
    resolve_m: int = Field(
        5, ge=1, description="consecutive windows under the recovery threshold needed to resolve"
    )
    cooldown_s: float = Field(
        300.0,
        ge=0.0,
        description="after a resolve, a new alert for the same device is suppressed for this many seconds "
        "(device time)",
    )
    update_every: int = Field(
        10, ge=1, description="send an update at most every this many anomalous windows of an open alert"
    )
    update_peak_growth: float = Field(
        0.2,
        gt=0.0,
        description="also send an update when the peak grew by this fraction since the last message",
    )
    critical_ratio: float = Field(
        3.0, gt=1.0, description="severity is critical once score / threshold reaches this ratio"
    )
    top_k: int = Field(3, ge=1, description="sensors listed in top_sensors")
    persist_every_s: float = Field(
        5.0, ge=0.0, description="save an open alert's counters at most this often between messages"
    )
