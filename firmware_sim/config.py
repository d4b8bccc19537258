"""Settings of one simulator run, validated before anything starts (shared by record and stream)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SimConfig(BaseModel):
    """Settings shared by every simulator output."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="random seed: same seed and arguments give the same numbers")
    devices: int = Field(1, ge=1, le=99, description="number of pumps, named pump-01, pump-02, ...")
    scenario: str = Field("normal", description="fault schedule; see `edgewatch sim scenarios`")
    rate: float = Field(1.0, gt=0, le=1000, description="samples per second per device")
    fault_after: float | None = Field(
        None, ge=0, description="sim seconds until the (first) fault starts; default scales with the horizon"
    )
    degradation: float | None = Field(
        None, gt=0, description="sim seconds of the degrading phase before failure (sensor faults: duration)"
    )
    duration: float | None = Field(None, gt=0, description="sim seconds to produce; None streams forever")
    speed: float = Field(1.0, gt=0, description="streaming pace: sim seconds per wall second (1 = real time)")
    start_ms: int = Field(description="device clock of the first reading, ms since the Unix epoch (UTC)")
