"""Drift: are a device's inputs and scores still distributed the way they were?

A model slowly stops fitting a machine whose sensors lose calibration, whose duty changes or whose
season does. That is not a fault (no alert), but it is why false alarms creep up or real faults go
quiet, so a scheduled job compares each device's recent period (`lookback_s`, a day by default so the
daily cycle is inside it) with a **reference** and publishes the result on
`<prefix>/<gateway>/<device>/drift` (schemas/drift.json) with Prometheus gauges.

Two references, because one is not enough (measured, docs/drift.md):
- the **bundle's training distribution** (`manifest.input_stats`, quantiles per channel, pooled over
  the training devices): its PSI is reported per channel (`psi_train`) and says how far a device is
  from what the model learnt, but it does not judge drift: pumps differ from one another by as much
  as a sensor fault (PSI 0.4-1.6 for healthy simulated pumps against the pooled training data), and
  the window scores of a healthy pump sit off the pooled calibration too (score PSI up to 1.25);
- the **device's own reference**, learnt on the gateway from its first `reference_s` of data under
  the current model and stored in SQLite: drift is judged against it. A channel has drifted when its
  recent median moved more than `shift_threshold` reference IQRs; the score has drifted when its
  recent median is more than `score_ratio` times the reference median. PSI against the device's own
  first day was measured too noisy to judge by (0.3-1.5 day to day on healthy pumps: slow load
  regimes and autocorrelated samples), the median shift was not (<= 0.45 IQR healthy, 0.84-1.03 by
  the third day of a +6 degC calibration drift).

The reference is relearnt when the model changes (scores depend on it) and can be reset with
`forget_reference` (after maintenance or a recalibration, the new normal is the new reference).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import sqlite_utils
from pydantic import BaseModel, ConfigDict, Field

from agent import metrics
from agent.bundle import Manifest
from agent.db import state_row
from agent.types import Event

log = logging.getLogger(__name__)

_EPS = 1e-4  # share floor: an empty bin must not make the PSI infinite
_KEY_PREFIX = "drift_ref:"
_REF_LEVELS = [float(v) for v in range(0, 101, 5)]


class DriftConfig(BaseModel):
    """[drift] settings: how often, and against what, a device's recent data is judged."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run the drift check.")
    interval_s: float = Field(3600.0, ge=10.0, description="Seconds between checks.")
    lookback_s: float = Field(
        86400.0,
        gt=0.0,
        description="Recent period judged, seconds; a day covers the daily cycle that a shorter "
        "period would mistake for drift.",
    )
    reference_s: float = Field(
        86400.0,
        gt=0.0,
        description="Length of the device's reference period (its first data under the current model), "
        "seconds; until that much is stored the device is 'learning'.",
    )
    min_readings: int = Field(
        600, ge=10, description="Finite readings of a channel needed in a period before it is judged."
    )
    min_scores: int = Field(
        200, ge=10, description="Window scores needed in a period before the score is judged."
    )
    max_samples: int = Field(
        20000, ge=100, description="Readings read per device and period at most (evenly thinned beyond)."
    )
    shift_threshold: float = Field(
        0.6,
        gt=0.0,
        description="A channel has drifted when its recent median is more than this many reference "
        "IQRs from the reference median (healthy simulated pumps stay <= 0.45).",
    )
    score_ratio: float = Field(
        1.5,
        gt=1.0,
        description="The score has drifted when its recent median is more than this times the "
        "reference median (healthy simulated pumps stay within 1.1).",
    )


def psi(values: np.ndarray, edges: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of `values` over bins cut at `edges` with `expected` shares.

    `edges` are the len(expected) - 1 interior cut points (increasing); NaN values are ignored.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan
    counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(expected))
    actual = np.maximum(counts / v.size, _EPS)
    exp = np.maximum(np.asarray(expected, dtype=np.float64), _EPS)
    return float(np.sum((actual - exp) * np.log(actual / exp)))


def _bins(levels: list[float], quantiles: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(interior edges, expected shares) from training quantiles at `levels` (percent, 0 and 100 at
    the ends). Tied quantiles (a channel that sat at one value) merge their bins."""
    q = np.asarray(quantiles, dtype=np.float64)
    lv = np.asarray(levels, dtype=np.float64) / 100.0
    edges, shares, acc = [], [], 0.0
    for i in range(1, len(q) - 1):
        acc += lv[i] - lv[i - 1]
        if not edges or q[i] > edges[-1]:
            edges.append(float(q[i]))
            shares.append(acc)
            acc = 0.0
    shares.append(acc + lv[-1] - lv[-2])
    return np.asarray(edges), np.asarray(shares)


def median_shift(recent: np.ndarray, ref_median: float, ref_iqr: float, floor: float) -> float:
    """(recent median - reference median) in reference IQRs; the IQR is floored so a channel that sat
    still in its reference period does not turn every wobble into drift."""
    if recent.size == 0:
        return math.nan
    return float((np.median(recent) - ref_median) / max(ref_iqr, floor))


@dataclass(slots=True)
class DeviceDrift:
    """One device's check. NaN figures mean 'not enough data to judge'."""

    device: str
    since: float
    until: float
    state: str  # "learning" (no reference yet), "stable" or "drifted"
    reference: dict | None  # {"since", "until"} of the reference period
    channels: dict[str, dict]
    score: dict
    drifted: list[str]


class DriftMonitor:
    """Judges each device's recent readings and scores in the agent database against its reference."""

    def __init__(self, config: DriftConfig, manifest: Manifest, model_id: str, gateway_id: str) -> None:
        if manifest.input_stats is None:
            raise ValueError(
                "the model bundle has no input_stats (training distribution): retrain it with this "
                "edgewatch version, or set [drift] enabled = false"
            )
        self.config = config
        self.model_id = model_id
        self.gateway_id = gateway_id
        self.channels = manifest.channel_names
        stats = manifest.input_stats
        pairs = list(zip(self.channels, stats.quantiles, strict=True))
        self._train_bins = {name: _bins(stats.levels, q) for name, q in pairs}
        self._train_median = {name: float(np.interp(50.0, stats.levels, q)) for name, q in pairs}
        # IQR floor: 5 % of the training IQR (or of the training range for a channel with no spread)
        self._iqr_floor = {}
        for name, q in pairs:
            iqr = float(np.interp(75.0, stats.levels, q) - np.interp(25.0, stats.levels, q))
            span = float(q[-1] - q[0])
            self._iqr_floor[name] = max(0.05 * (iqr if iqr > 0 else span), 1e-9)
        self._p99 = manifest.calibration.quantiles["p99"]

    # -- data ---------------------------------------------------------------------------------
    def _readings(self, db: sqlite_utils.Database, device: str, since: float, until: float) -> np.ndarray:
        """[n, channels] values of the device in [since, until), evenly thinned to max_samples; a
        missing or null value stays NaN (and is ignored), never 0."""
        (count,) = db.execute(
            "SELECT count(*) FROM readings WHERE device = ? AND ts >= ? AND ts < ?", [device, since, until]
        ).fetchone()
        step = max(1, math.ceil(count / self.config.max_samples))
        cols = ", ".join(f"json_extract(values_json, '$.\"{c}\"')" for c in self.channels)
        rows = db.execute(
            f"SELECT {cols} FROM readings WHERE device = ? AND ts >= ? AND ts < ? AND rowid % ? = 0",
            [device, since, until, step],
        ).fetchall()
        return np.array(
            [[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64
        ).reshape(len(rows), len(self.channels))

    def _scores(self, db: sqlite_utils.Database, device: str, since: float, until: float) -> np.ndarray:
        rows = db.execute(
            "SELECT error FROM scores WHERE device = ? AND end_ts >= ? AND end_ts < ? AND model_id = ?",
            [device, since, until, self.model_id],
        ).fetchall()
        v = np.array([r[0] for r in rows], dtype=np.float64)
        return v[np.isfinite(v)]

    # -- reference ----------------------------------------------------------------------------
    def _key(self, device: str) -> str:
        return f"{_KEY_PREFIX}{self.model_id}:{device}"

    def reference(self, db: sqlite_utils.Database, device: str, now: float) -> dict | None:
        """The device's stored reference, learnt now if its first `reference_s` under this model is
        complete; None while it is still learning."""
        row = db.execute("SELECT value_json FROM state WHERE key = ?", [self._key(device)]).fetchone()
        stored = json.loads(row[0]) if row is not None else {}
        if "channels" in stored:
            return stored
        learn_from = float(stored.get("learn_from", -math.inf))  # set by forget_reference
        (first,) = db.execute(
            "SELECT min(end_ts) FROM scores WHERE device = ? AND model_id = ? AND end_ts >= ?",
            [device, self.model_id, learn_from],
        ).fetchone()
        if first is None:  # scored by no window of this model yet: the model's time starts with the data
            (first,) = db.execute(
                "SELECT min(ts) FROM readings WHERE device = ? AND ts >= ?", [device, learn_from]
            ).fetchone()
        if first is None or now - first < self.config.reference_s:
            return None
        since, until = float(first), float(first) + self.config.reference_s
        data = self._readings(db, device, since, until)
        channels: dict[str, dict | None] = {}
        for j, name in enumerate(self.channels):
            col = data[:, j][np.isfinite(data[:, j])]
            if col.size < self.config.min_readings:
                channels[name] = None
                continue
            q25, q50, q75 = np.percentile(col, [25, 50, 75])
            channels[name] = {"median": float(q50), "iqr": float(q75 - q25), "n": int(col.size)}
        scores = self._scores(db, device, since, until)
        score = (
            {"median": float(np.median(scores)), "n": int(scores.size)}
            if scores.size >= self.config.min_scores
            else None
        )
        ref = {"since": since, "until": until, "channels": channels, "score": score}
        db["state"].upsert(state_row(self._key(device), ref), pk="key")
        log.info(
            "drift reference of %s learnt from %d s of data (model %s)",
            device,
            int(until - since),
            self.model_id,
        )
        return ref

    def forget_reference(self, db: sqlite_utils.Database, now: float, device: str | None = None) -> int:
        """Drop the reference of one device (or of every device, for this model), to be learnt anew
        from the data after `now`: after maintenance or a recalibration the new normal is the new
        reference. Returns the number of devices reset."""
        if device is not None:
            devices = [device]
        else:
            devices = [r[0] for r in db.execute("SELECT DISTINCT device FROM readings")]
        with db.conn:
            db["state"].upsert_all([state_row(self._key(d), {"learn_from": now}) for d in devices], pk="key")
        return len(devices)

    # -- checks -------------------------------------------------------------------------------
    def check(self, db: sqlite_utils.Database, now: float) -> list[DeviceDrift]:
        """Every device with readings in the lookback period."""
        since = now - self.config.lookback_s
        devices = [r[0] for r in db.execute("SELECT DISTINCT device FROM readings WHERE ts >= ?", [since])]
        return [self.check_device(db, d, since, now) for d in sorted(devices)]

    def check_device(self, db: sqlite_utils.Database, device: str, since: float, until: float) -> DeviceDrift:
        cfg = self.config
        ref = self.reference(db, device, until)
        # judged once a whole lookback period lies after the reference (never part of itself)
        judged = ref is not None and until - ref["until"] >= cfg.lookback_s * 0.999
        recent_since = max(since, ref["until"]) if ref is not None else since
        data = self._readings(db, device, recent_since, until)
        channels: dict[str, dict] = {}
        drifted: list[str] = []
        for j, name in enumerate(self.channels):
            col = data[:, j][np.isfinite(data[:, j])]
            enough = col.size >= cfg.min_readings
            r = ref["channels"].get(name) if ref is not None else None
            shift = (
                median_shift(col, r["median"], r["iqr"], self._iqr_floor[name])
                if judged and enough and r is not None
                else math.nan
            )
            is_drifted = bool(abs(shift) > cfg.shift_threshold)
            channels[name] = {
                "shift": _num(shift),
                "drifted": is_drifted,
                "n": int(col.size),
                "recent_median": _num(float(np.median(col)) if col.size else math.nan),
                "reference_median": _num(r["median"]) if r is not None else None,
                "train_median": _num(self._train_median[name]),
                "psi_train": _num(psi(col, *self._train_bins[name]) if enough else math.nan),
            }
            metrics.DRIFT_SHIFT.labels(device, name).set(shift)
            if is_drifted:
                drifted.append(name)
        scores = self._scores(db, device, recent_since, until)
        rs = ref["score"] if ref is not None else None
        ratio = (
            float(np.median(scores)) / max(rs["median"], 1e-12)
            if judged and rs is not None and scores.size >= cfg.min_scores
            else math.nan
        )
        s_drifted = bool(ratio > cfg.score_ratio)
        score = {
            "ratio": _num(ratio),
            "drifted": s_drifted,
            "n": int(scores.size),
            "recent_median": _num(float(np.median(scores)) if scores.size else math.nan),
            "reference_median": _num(rs["median"]) if rs is not None else None,
            "share_over_p99": _num(float(np.mean(scores > self._p99)) if scores.size else math.nan),
        }
        metrics.DRIFT_SCORE_RATIO.labels(device).set(ratio)
        if s_drifted:
            drifted.append("score")
        state = "drifted" if drifted else ("stable" if judged else "learning")
        ref_span = {"since": ref["since"], "until": ref["until"]} if ref is not None else None
        return DeviceDrift(device, recent_since, until, state, ref_span, channels, score, drifted)

    def events(self, db: sqlite_utils.Database, now: float) -> list[Event]:
        """Run a check and turn every device's result into a drift message."""
        out = []
        for d in self.check(db, now):
            if d.drifted:
                log.warning("drift on %s: %s (against its reference)", d.device, ", ".join(d.drifted))
            out.append(Event("drift", d.device, self.payload(d)))
        return out

    def payload(self, d: DeviceDrift) -> dict:
        return {
            "v": 1,
            "type": "drift",
            "msg_id": f"drift-{_slug(d.device)}-{int(d.until * 1000)}",
            "gateway": self.gateway_id,
            "device": d.device,
            "model_id": self.model_id,
            "ts": d.until,
            "since": d.since,
            "state": d.state,
            "drifted": d.drifted,
            "reference": d.reference,
            "shift_threshold": self.config.shift_threshold,
            "score_ratio": self.config.score_ratio,
            "channels": d.channels,
            "score": d.score,
        }


def _num(v: float) -> float | None:
    """JSON has no NaN: 'not enough data' is null."""
    return None if not math.isfinite(v) else round(float(v), 6)


def _slug(device: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in device)[:64]
