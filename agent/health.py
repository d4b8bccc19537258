"""Sensor health: silent devices, stuck channels, bursts of out-of-range, NaN and garbage input.

Stage: Reading / Reject / clock tick -> health Events (raised / cleared). Sensor faults are reported
here as their own events and never reach the anomaly detector as fake machine anomalies.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HealthConfig(BaseModel):
    """[health] settings: when a sensor or a line is reported unhealthy, and when it is cleared."""

    model_config = ConfigDict(extra="forbid")

    silence_s: float = Field(
        30.0, gt=0.0, description="a known device with no reading for this long (gateway clock) is silent"
    )
    stuck_n: int = Field(
        30, ge=2, description="consecutive readings of one channel within stuck_eps of each other = stuck"
    )
    stuck_eps: float = Field(
        0.0, ge=0.0, description="max range (max - min) of a stuck run; 0 = exact equality"
    )
    reject_k: int = Field(
        5, ge=1, description="offending inputs (out_of_range, nan, garbage) within reject_window_s to raise"
    )
    reject_window_s: float = Field(60.0, gt=0.0, description="sliding window for counting offending inputs")
    clear_s: float = Field(
        60.0,
        gt=0.0,
        description="an out_of_range / nan / garbage event clears after this long without offences",
    )
