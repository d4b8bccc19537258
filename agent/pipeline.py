"""The pipeline: one input in, events out, in one thread.

parse -> validate -> buffer -> window -> score -> threshold -> alert, with sensor health watching the
inputs on the side. The live service and replay both drive this same object, so replay behaves
exactly like live: there is no second scoring path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from agent import metrics
from agent.alert import AlertConfig, AlertManager
from agent.buffer import Buffer, BufferConfig
from agent.bundle import Bundle
from agent.health import HealthConfig, HealthMonitor
from agent.parse import parse_many
from agent.score import Scorer
from agent.screen import Screen, ScreenConfig, make_screen
from agent.threshold import ThresholdConfig, Thresholder, make_thresholder
from agent.types import Event, Judgement, RawMessage, Reading, Reject, Window
from agent.validate import ValidationConfig, Validator
from agent.window import WindowConfig, Windower

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]


class ScoringError(RuntimeError):
    """The model failed on windows it was given (the service rolls back a freshly promoted model)."""


@dataclass
class PipelineStats:
    """Counts since start, for the status message and tests; Prometheus has the long-term series."""

    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    windows: int = 0
    anomalous_windows: int = 0
    skipped_windows: int = 0  # windows the screen kept from the autoencoder
    events: dict[str, int] = field(default_factory=dict)


class Pipeline:
    """Wires the stages. Owns no thread and no I/O of its own beyond what the stages do."""

    def __init__(
        self,
        *,
        validator: Validator,
        buffer: Buffer,
        scorer: Scorer,
        windower: Windower,
        thresholder: Thresholder,
        alerts: AlertManager,
        health: HealthMonitor,
        emit: Emit,
        on_judgement: Callable[[Judgement], None] | None = None,
        screen: Screen | None = None,
    ) -> None:
        self.validator = validator
        self.buffer = buffer
        self.scorer = scorer
        self.windower = windower
        self.thresholder = thresholder
        self.alerts = alerts
        self.health = health
        self._emit = emit
        self._on_judgement = on_judgement
        self.stats = PipelineStats()
        self._metric_children: dict[str, tuple[Any, Any]] = {}
        self.shadow: Any = None  # agent.rollout.Shadow while a candidate model is scored beside
        self.screen = screen  # agent.screen: None = every window is scored

    # -- inputs ---------------------------------------------------------------------------------
    def process_raw(self, msg: RawMessage, on_error: Callable[[Exception], None] | None = None) -> None:
        """A line or payload as it came off the wire: each reading it carries (a batch payload has
        several) goes through the stages exactly as if it had come alone, with the message's
        `received` time. A reading whose processing raises does not cost the readings after it:
        `on_error` gets the exception and the loop goes on (what the service does per message);
        without `on_error` the first exception is raised once the whole message is processed."""
        first: Exception | None = None
        for item in parse_many(msg):
            try:
                if isinstance(item, Reject):
                    self.validator.note_reject(item)  # counted by reason, logged at a rate limit
                    self._rejected(item, msg.origin, msg.received)
                else:
                    self.process_reading(item, now=msg.received, origin=msg.origin)
            except Exception as exc:
                if on_error is not None:
                    on_error(exc)
                elif first is None:
                    first = exc
                else:
                    log.error("another error in the same message from %s", msg.origin, exc_info=exc)
        if first is not None:
            raise first

    def process_reading(self, reading: Reading, *, now: float | None = None, origin: str = "") -> None:
        """A parsed reading (live sources after parsing, or replay straight from a recording)."""
        checked = self.validator.check(reading, now)
        if isinstance(checked, Reject):
            self._rejected(checked, origin or reading.device, now if now is not None else reading.ts)
            return
        self.stats.accepted += 1
        events = self.health.observe_reading(checked)
        if events:
            self._send(events)
        self.buffer.add(checked)
        windows = self.windower.push(checked)
        if windows:
            self.score_windows(windows)
        if self.shadow is not None:
            self.shadow.push(checked)

    def score_windows(self, windows: list[Window]) -> list[Judgement]:
        """Score a batch of ready windows and run each verdict through threshold and alerts."""
        screen = self.screen
        if screen is not None:  # skipped windows get no Judgement at all (agent/screen.py says why)
            send = screen.flag(windows, busy=lambda d: self.alerts.open_alert(d) is not None)
            if not all(send):
                self.stats.skipped_windows += len(windows) - sum(send)
                windows = [w for w, s in zip(windows, send, strict=True) if s]
                if not windows:
                    return []
        t0 = time.perf_counter()
        try:
            scores = self.scorer.score(windows)
        except Exception as exc:  # told apart from other failures: a new model may be rolled back
            raise ScoringError(f"model {self.scorer.model_id} failed to score: {exc}") from exc
        metrics.SCORE_LATENCY.observe(time.perf_counter() - t0)
        judgements: list[Judgement] = []
        for score in scores:
            judgement = self.thresholder.classify(score)
            # While an alert is open, scores just under the threshold are not "normal" either:
            # keep them out of the baseline so the fault cannot raise its own bar.
            learn = self.alerts.open_alert(score.device) is None
            if screen is not None:  # the screen also says which windows are the baseline's sample
                learn = screen.observe(judgement, alert_open=not learn) and learn
            if learn:
                self.thresholder.learn_one(judgement)
            judgements.append(judgement)
            scored, last = self._device_metrics(score.device)
            scored.inc()
            last.set(score.error)
            self.stats.windows += 1
            self.stats.anomalous_windows += int(judgement.anomalous)
            if self._on_judgement is not None:
                self._on_judgement(judgement)
            self._send(self.alerts.update(judgement))
        self.buffer.add_judgements(judgements)
        if self.shadow is not None:
            self.shadow.note_main(judgements)
        return judgements

    def tick(self, now: float) -> None:
        """Time-driven checks (silence); called by the service's loop, and by replay on data time."""
        self._send(self.health.tick(now))

    def tick_due(self) -> float:
        """Before this time `tick` is a no-op (replay uses it to skip the ticks of long data gaps)."""
        return self.health.next_due()

    # -- model swap -----------------------------------------------------------------------------
    def swap_scorer(self, scorer: Scorer, windower: Windower, thresholder: Thresholder) -> None:
        """Install a new verified model. Called only from the pipeline's own thread."""
        self.scorer = scorer
        self.windower = windower
        self.thresholder = thresholder
        if self.screen is not None:  # another grid and feature scale: warm up again
            self.screen = Screen(self.screen.config, scorer.period, scorer.stride, self.screen.hold)

    # -- helpers --------------------------------------------------------------------------------
    def _device_metrics(self, device: str) -> tuple[Any, Any]:
        """The device's WINDOWS_SCORED and LAST_SCORE children, looked up once (labels() is not free)."""
        pair = self._metric_children.get(device)
        if pair is None:
            pair = self._metric_children[device] = (
                metrics.WINDOWS_SCORED.labels(device),
                metrics.LAST_SCORE.labels(device),
            )
        return pair

    def _rejected(self, reject: Reject, origin: str, now: float) -> None:
        self.stats.rejected[reject.reason] = self.stats.rejected.get(reject.reason, 0) + 1
        self._send(self.health.observe_reject(reject, origin, now))

    def _send(self, events: list[Event]) -> None:
        for event in events:
            key = f"{event.topic_kind}:{event.payload.get('state', '')}"
            self.stats.events[key] = self.stats.events.get(key, 0) + 1
            self._emit(event)


@dataclass
class StageSettings:
    """The per-stage settings a pipeline needs: the live config's sections, or defaults for replay."""

    gateway_id: str = "replay"
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    threads: int = 1

    @classmethod
    def from_config(cls, config: Any) -> StageSettings:
        """From an `agent.config.AgentConfig` (typed loosely to keep this module free of config)."""
        return cls(
            gateway_id=config.gateway.id,
            validation=config.validation,
            buffer=config.buffer,
            window=config.window,
            threshold=config.threshold,
            alerts=config.alerts,
            health=config.health,
            screen=config.screen,
            threads=config.model.threads,
        )


def channel_norm(bundle: Bundle) -> dict[str, float] | None:
    """Per-channel calibration error means, so attribution is not won by a naturally noisy channel."""
    means = bundle.manifest.calibration.channel_error_mean
    return dict(zip(bundle.manifest.channel_names, means, strict=True)) if means else None


def model_stages(
    settings: StageSettings, bundle: Bundle, db: sqlite_utils.Database | None
) -> tuple[Scorer, Windower, Thresholder]:
    """The stages that depend on the model; rebuilt together when a new bundle is swapped in."""
    scorer = Scorer(bundle, threads=settings.threads)
    windower = Windower(
        scorer.channels, scorer.window, scorer.stride, scorer.period, settings.window.max_gap_s
    )
    thresholder = make_thresholder(
        settings.threshold, bundle.manifest.calibration.quantiles, db, model_id=bundle.model_id
    )
    return scorer, windower, thresholder


def prime_windower(windower: Windower, buffer: Buffer) -> int:
    """Warm a new windower from stored readings (after a restart or a model swap) so scoring resumes
    with the next window instead of a full window length later. Windows it completes are not scored
    again: they were scored before."""
    span = (windower.window + windower.stride) * windower.period + windower.max_gap
    skipped = 0
    for device, last in buffer.last_ts_by_device().items():
        skipped += windower.prime(buffer.readings_between(device, last - span, float("inf")))
    return skipped


def build_pipeline(
    settings: StageSettings,
    bundle: Bundle,
    db: sqlite_utils.Database,
    emit: Emit,
    *,
    on_judgement: Callable[[Judgement], None] | None = None,
) -> Pipeline:
    """One pipeline from settings + a verified bundle + an open database (live and replay alike)."""
    buffer = Buffer(db, settings.buffer)
    validator = Validator(settings.validation)
    validator.restore(buffer.last_ts_by_device())
    scorer, windower, thresholder = model_stages(settings, bundle, db)
    prime_windower(windower, buffer)
    return Pipeline(
        validator=validator,
        buffer=buffer,
        scorer=scorer,
        windower=windower,
        thresholder=thresholder,
        alerts=AlertManager(settings.alerts, settings.gateway_id, db, channel_norm=channel_norm(bundle)),
        health=HealthMonitor(settings.health, settings.gateway_id),
        emit=emit,
        on_judgement=on_judgement,
        screen=make_screen(
            settings.screen,
            scorer.period,
            scorer.stride,
            settings.alerts.open_n,
            settings.threshold.ewma_alpha,
        ),
    )
