"""Alerts from judgements: k-of-n to open, hysteresis and m windows to resolve, cooldown, attribution.

Stage: Judgement -> alert Events (open / update / resolve). Alert ids are deterministic from device,
opened_ts and model_id, so a replay of the same data produces the same ids as the live run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import sqlite_utils
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent import metrics
from agent.db import read_state, state_row, upsert_rows
from agent.types import Event, Judgement, Score

log = logging.getLogger(__name__)

_KEY_PREFIX = "alert:"


class AlertConfig(BaseModel):
    """[alerts] settings: when an anomaly becomes an alert, how often it is updated, when it resolves."""

    model_config = ConfigDict(extra="forbid")

    open_k: int = Field(
        10, ge=1, description="anomalous windows among the last open_n needed to open an alert"
    )
    open_n: int = Field(12, ge=1, description="size of the k-of-n window used to open an alert")
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
        10,
        ge=1,
        description="routine update every this many anomalous windows of an open alert (not more often, "
        "unless the peak grows or severity escalates)",
    )
    update_peak_growth: float = Field(
        0.2,
        gt=0.0,
        description="also send an update when the peak grew by this fraction since the last message",
    )
    critical_ratio: float = Field(
        3.0, gt=1.0, description="severity is critical once score / threshold reaches this ratio"
    )
    top_k: int = Field(3, ge=1, le=3, description="sensors listed in top_sensors (the payload allows 3)")
    persist_every_s: float = Field(
        5.0,
        ge=0.0,
        description="counters that change without a message (k-of-n history, windows since the last "
        "update) are saved at most this often; every message is saved at once",
    )

    @model_validator(mode="after")
    def _k_within_n(self) -> AlertConfig:
        if self.open_k > self.open_n:
            raise ValueError(f"open_k ({self.open_k}) cannot exceed open_n ({self.open_n})")
        return self


def alert_id(device: str, opened_ts: float, model_id: str) -> str:
    """Deterministic id: the same data replayed through the same model gives the same alert ids."""
    return hashlib.sha256(f"{device}|{opened_ts:.3f}|{model_id}".encode()).hexdigest()[:16]


@dataclass
class _Open:
    """An open alert's running state (persisted, so a restart continues it)."""

    alert_id: str
    opened_ts: float
    model_id: str
    n: int = 0  # n of the last message sent (0 = the open)
    windows: int = 0  # anomalous windows so far
    peak: float = 0.0
    severity: str = "warning"
    contrib: dict[str, float] = field(default_factory=dict)  # normalised channel errors, summed
    since_msg: int = 0  # anomalous windows since the last message
    peak_at_msg: float = 0.0
    below: int = 0  # consecutive windows under the recovery threshold


@dataclass
class _Device:
    # recent judgements before an open: (anomalous, score, score/threshold, normalised channel errors)
    recent: deque[tuple[bool, float, float, dict[str, float]]]
    alert: _Open | None = None
    cooldown_until: float | None = None
    dirty: bool = False


def _plain(j: Judgement) -> Judgement:
    """The same judgement in plain Python numbers (the scorer may hand numpy scalars), so payloads and
    persisted state serialise as JSON."""
    s = j.score
    score = Score(
        device=s.device,
        start_ts=float(s.start_ts),
        end_ts=float(s.end_ts),
        error=float(s.error),
        channel_errors={str(k): float(v) for k, v in s.channel_errors.items()},
        model_id=str(s.model_id),
    )
    return Judgement(score=score, threshold=float(j.threshold), anomalous=bool(j.anomalous))


class AlertManager:
    """Turns one device's stream of judgements into alert open / update / resolve events.

    Open: open_k of the last open_n windows anomalous (isolated spikes do not alert), unless the device
    is in cooldown after a resolve. Update: every update_every anomalous windows, or when the peak grows
    by update_peak_growth, or on escalation to critical. Resolve: resolve_m consecutive windows under
    recovery_ratio x threshold (scores between that and the threshold keep the alert open).
    """

    def __init__(
        self,
        config: AlertConfig,
        gateway_id: str,
        db: sqlite_utils.Database | None = None,
        channel_norm: dict[str, float] | None = None,
    ) -> None:
        self.config = config
        self.gateway_id = gateway_id
        self.db = db
        self._devices: dict[str, _Device] = {}
        self._warned_norm: set[str] = set()
        self._norm: dict[str, float] = {}
        self.channel_norm = channel_norm
        self._pending_rows: dict[str, dict] = {}  # alerts-table rows not yet written
        # Live: persist after every event, so a crash never loses an alert that went out. A replay turns
        # it off (agent.replay): its events are not sent anywhere, and the recording can be replayed.
        self.save_on_event = True
        self._last_persist = time.monotonic()
        if db is not None:
            self._restore()

    @property
    def channel_norm(self) -> dict[str, float]:
        """Per-channel calibration error means used to normalise attribution ({} = raw errors)."""
        return self._norm

    @channel_norm.setter
    def channel_norm(self, value: dict[str, float] | None) -> None:
        """Settable on a model swap. Unusable figures (zero, negative, NaN) disable normalisation as a whole
        with an error logged, rather than stop the agent or mix normalised and raw channels."""
        norm: dict[str, float] = {}
        for ch, v in (value or {}).items():
            try:
                norm[str(ch)] = float(v)
            except (TypeError, ValueError):
                norm[str(ch)] = math.nan
        bad = {ch: v for ch, v in norm.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            log.error("channel error means %s are not positive numbers: attribution uses raw errors", bad)
            norm = {}
        self._norm = norm
        self._warned_norm = set()

    # -- pipeline API -------------------------------------------------------------------------------
    def update(self, judgement: Judgement) -> list[Event]:
        judgement = _plain(judgement)
        score = judgement.score
        dev = self._device(score.device)
        ratio = score.error / judgement.threshold if judgement.threshold > 0 else math.inf
        events: list[Event] = []
        if dev.alert is None:
            dev.recent.append((judgement.anomalous, score.error, ratio, self._normalise(score)))
            dev.dirty = True
            if judgement.anomalous and sum(a for a, *_ in dev.recent) >= self.config.open_k:
                if dev.cooldown_until is not None and score.end_ts < dev.cooldown_until:
                    metrics.ALERTS.labels("anomaly", "suppressed").inc()
                else:
                    events.append(self._open(dev, judgement))
        else:
            events.extend(self._continue(dev, judgement, ratio))
        if (
            events and self.save_on_event
        ) or time.monotonic() - self._last_persist >= self.config.persist_every_s:
            try:
                self.save()
            except sqlite3.Error as exc:
                # the events still go out and the state stays in memory (dirty), so the next save retries
                metrics.DB_ERRORS.labels("alert_state").inc()
                log.error("could not persist alert state (will retry): %s", exc)
        return events

    def open_alert(self, device: str) -> dict | None:
        """The open alert of a device as last sent (None if none is open)."""
        dev = self._devices.get(device)
        if dev is None or dev.alert is None:
            return None
        return {"alert_id": dev.alert.alert_id, "opened_ts": dev.alert.opened_ts, "n": dev.alert.n}

    def save(self) -> None:
        """Write pending alert rows and changed device states in one transaction, so they never disagree.

        Called after every emitted event, at most every persist_every_s otherwise, and on shutdown.
        """
        self._last_persist = time.monotonic()
        dirty = [(d, s) for d, s in self._devices.items() if s.dirty]
        if self.db is None:
            self._pending_rows.clear()
            for _, dev in dirty:
                dev.dirty = False
            return
        if not dirty and not self._pending_rows:
            return
        with self.db.atomic():
            upsert_rows(self.db, "alerts", list(self._pending_rows.values()), pk="alert_id")
            upsert_rows(self.db, "state", [self._state_row(device, dev) for device, dev in dirty], pk="key")
        self._pending_rows.clear()
        for _, dev in dirty:
            dev.dirty = False

    # -- transitions --------------------------------------------------------------------------------
    def _open(self, dev: _Device, judgement: Judgement) -> Event:
        score = judgement.score
        anomalous = [r for r in dev.recent if r[0]]
        opened_ts = score.end_ts
        alert = _Open(
            alert_id=alert_id(score.device, opened_ts, score.model_id),
            opened_ts=opened_ts,
            model_id=score.model_id,
        )
        for _, err, ratio, norm in anomalous:
            alert.windows += 1
            alert.peak = max(alert.peak, err)
            if ratio >= self.config.critical_ratio:
                alert.severity = "critical"
            for ch, v in norm.items():
                alert.contrib[ch] = alert.contrib.get(ch, 0.0) + v
        alert.peak_at_msg = alert.peak
        dev.alert = alert
        dev.recent.clear()
        return self._event(score.device, alert, judgement, "open")

    def _continue(self, dev: _Device, judgement: Judgement, ratio: float) -> list[Event]:
        alert = dev.alert
        assert alert is not None
        score = judgement.score
        dev.dirty = True
        if judgement.anomalous:
            alert.below = 0
            alert.windows += 1
            alert.since_msg += 1
            alert.peak = max(alert.peak, score.error)
            for ch, v in self._normalise(score).items():
                alert.contrib[ch] = alert.contrib.get(ch, 0.0) + v
            escalated = alert.severity == "warning" and ratio >= self.config.critical_ratio
            if escalated:
                alert.severity = "critical"
            grew = alert.peak >= alert.peak_at_msg * (1.0 + self.config.update_peak_growth)
            if escalated or grew or alert.since_msg >= self.config.update_every:
                alert.n += 1
                alert.since_msg = 0
                alert.peak_at_msg = alert.peak
                return [self._event(score.device, alert, judgement, "update")]
            return []
        if score.error < self.config.recovery_ratio * judgement.threshold:
            alert.below += 1
        else:
            alert.below = 0  # hysteresis band: not anomalous, not recovered either
        if alert.below < self.config.resolve_m:
            return []
        alert.n += 1
        event = self._event(score.device, alert, judgement, "resolve", resolved_ts=score.end_ts)
        dev.alert = None
        dev.cooldown_until = score.end_ts + self.config.cooldown_s
        dev.recent.clear()
        return [event]

    def _event(
        self, device: str, alert: _Open, judgement: Judgement, state: str, resolved_ts: float | None = None
    ) -> Event:
        payload = {
            "v": 1,
            "type": "alert",
            "msg_id": f"{alert.alert_id}:{alert.n}",
            "alert_id": alert.alert_id,
            "state": state,
            "gateway": self.gateway_id,
            "device": device,
            "model_id": alert.model_id,
            "ts": judgement.score.end_ts,
            "opened_ts": alert.opened_ts,
            "resolved_ts": resolved_ts,
            "score": judgement.score.error,
            "threshold": judgement.threshold,
            "peak": alert.peak,
            "severity": alert.severity,
            "top_sensors": self._top(alert.contrib),
            "windows": alert.windows,
        }
        metrics.ALERTS.labels("anomaly", state).inc()
        self._pending_rows[alert.alert_id] = {
            "alert_id": alert.alert_id,
            "device": device,
            "kind": "anomaly",
            "state": "resolved" if state == "resolve" else "open",
            "opened_ts": alert.opened_ts,
            "updated_ts": judgement.score.end_ts,
            "resolved_ts": resolved_ts,
            "peak": alert.peak,
            "payload_json": json.dumps(payload),
        }
        return Event(topic_kind="alert", device=device, payload=payload)

    # -- attribution --------------------------------------------------------------------------------
    def _normalise(self, score: Score) -> dict[str, float]:
        """Channel errors divided by their calibration mean, so a naturally noisy channel does not win."""
        out: dict[str, float] = {}
        for ch, err in score.channel_errors.items():
            if not math.isfinite(err) or err < 0:
                continue
            norm = self._norm.get(ch)
            if norm is None:
                if self._norm and ch not in self._warned_norm:
                    self._warned_norm.add(ch)
                    log.warning("no calibration error stats for channel %s: its raw error is used", ch)
                norm = 1.0
            out[ch] = err / norm
        return out

    def _top(self, contrib: dict[str, float]) -> list[dict]:
        total = sum(contrib.values())
        if total <= 0:
            return []
        ranked = sorted(contrib.items(), key=lambda kv: (-kv[1], kv[0]))[: self.config.top_k]
        # floor to 3 decimals so the listed shares never sum above 1
        return [{"channel": ch, "share": math.floor(v / total * 1000) / 1000} for ch, v in ranked]

    # -- persistence --------------------------------------------------------------------------------
    def _device(self, device: str) -> _Device:
        dev = self._devices.get(device)
        if dev is None:
            dev = _Device(recent=deque(maxlen=self.config.open_n))
            self._devices[device] = dev
        return dev

    @staticmethod
    def _state_row(device: str, dev: _Device) -> dict[str, object]:
        state = {
            "v": 1,
            "recent": [list(r) for r in dev.recent],
            "alert": asdict(dev.alert) if dev.alert is not None else None,
            "cooldown_until": dev.cooldown_until,
        }
        return state_row(f"{_KEY_PREFIX}{device}", state)

    def _restore(self) -> None:
        assert self.db is not None
        for device, value_json in read_state(self.db, _KEY_PREFIX):
            try:
                state = json.loads(value_json)
                dev = _Device(
                    recent=deque(
                        ((bool(a), float(e), float(r), dict(c)) for a, e, r, c in state["recent"]),
                        maxlen=self.config.open_n,
                    ),
                    alert=_Open(**state["alert"]) if state["alert"] is not None else None,
                    cooldown_until=state["cooldown_until"],
                )
            except (ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable alert state for %s: %s", device, exc)
                continue
            self._devices[device] = dev
