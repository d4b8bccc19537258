"""Data that flows between pipeline stages.

Stages talk only through these types, so each stage can be tested alone and replay can feed the
same objects the live sources produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class RawMessage:
    """What a source hands to the parser: bytes as they came off the wire, plus where from."""

    payload: bytes
    kind: str  # "serial" (one protocol line) or "mqtt" (one JSON payload)
    origin: str  # port path or MQTT topic, for logs and per-device checks
    received: float  # gateway clock (time.time()) at arrival


@dataclass(slots=True)
class Reading:
    """One validated-or-not sample of one device. Missing values are NaN, never 0."""

    device: str
    ts: float  # device timestamp, seconds since the Unix epoch, UTC
    values: dict[str, float]  # channel name -> value in physical units
    seq: int | None = None
    received: float | None = None  # gateway clock at arrival (None for replayed data)


@dataclass(slots=True)
class Reject:
    """Input that did not become a Reading. `reason` is one of the codes in docs/protocol.md."""

    reason: str
    detail: str
    device: str | None = None
    raw: bytes | None = None


@dataclass(slots=True)
class Window:
    """A fixed-length, evenly sampled slice of one device's readings, in the bundle's channel order."""

    device: str
    start_ts: float
    end_ts: float  # timestamp of the last sample in the window
    data: np.ndarray  # float32 [window, channels], physical units (scaling happens in score)


@dataclass(slots=True)
class Score:
    """Reconstruction error of one window, with each channel's share for attribution."""

    device: str
    start_ts: float
    end_ts: float
    error: float
    channel_errors: dict[str, float]  # channel -> its error term; shares = term / sum
    model_id: str


@dataclass(slots=True)
class Judgement:
    """A thresholder's verdict on one score."""

    score: Score
    threshold: float
    anomalous: bool


@dataclass(slots=True)
class Event:
    """Something to send upstream: an alert open/update/resolve, a health event, a status message."""

    topic_kind: str  # "alert", "health", "status", "drift"
    device: str | None
    payload: dict = field(default_factory=dict)
