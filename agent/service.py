"""`edgewatch run`: builds the pipeline from the config and runs it until SIGTERM/SIGINT.

Threads: each source and the uplink's MQTT client have their own; everything that touches pipeline
state (SQLite buffer, windows, thresholds, alerts) runs in the one main-loop thread. Sources put raw
messages on a queue; apscheduler jobs put *tasks* on the same queue, so periodic work never races
the pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from agent import __version__, metrics
from agent.bundle import Bundle, BundleError, load_bundle
from agent.command import (
    CommandError,
    DriftResetCommand,
    LabelCommand,
    ReloadCommand,
    parse_command,
    store_label,
)
from agent.config import AgentConfig, ConfigError, load_config, warnings_for
from agent.db import open_db
from agent.drift import DriftMonitor
from agent.notify import Notifier
from agent.pipeline import (
    ScoringError,
    StageSettings,
    build_pipeline,
    channel_norm,
    model_stages,
    prime_windower,
)
from agent.rollout import ModelStore, Shadow
from agent.source import MqttSource, MqttSourceConfig, Source, make_source
from agent.types import Event, RawMessage
from agent.uplink import ConsoleSink, Outbox, Uplink, topic_level
from agent.webhook import WebhookSink

log = logging.getLogger("edgewatch")

Task = Callable[[], None]
Item = RawMessage | Task


class Inbox:
    """The main loop's queue: raw messages from the sources and tasks from the scheduler, in order.

    Bounded by items and by payload bytes (back-pressure: a full inbox blocks the source thread
    instead of dropping; a batch payload may be 64 KiB, so a count alone would allow gigabytes).
    Unlike `queue.Queue`, a source puts a whole network read at once (`put_many`) and the main loop
    takes everything waiting at once (`take`): one lock round and at most one wake-up per burst, not
    per message. A batch is let in whole once there is room, so a bound can be passed by one batch.
    """

    def __init__(self, maxsize: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._items: deque[Item] = deque()
        self._bytes = 0  # payload bytes of the raw messages waiting
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, item: Item, block: bool = True) -> None:
        """Append one item; waits for room (or raises `queue.Full` with `block=False`)."""
        self._put([item], block)

    def put_nowait(self, item: Item) -> None:
        self._put([item], block=False)

    def put_many(self, items: list[RawMessage]) -> None:
        """Append a source's batch in order; waits while the inbox is full."""
        self._put(items, block=True)

    def _put(self, items: Sequence[Item], block: bool) -> None:
        with self._not_full:
            while len(self._items) >= self.maxsize or self._bytes >= self.max_bytes:
                if not block:
                    raise queue.Full
                self._not_full.wait()
            self._items.extend(items)
            self._bytes += sum(len(m.payload) for m in items if isinstance(m, RawMessage))
            self._not_empty.notify()

    def take(self, timeout: float) -> list[Item]:
        """Everything waiting, oldest first; waits up to `timeout` when there is nothing (then [])."""
        with self._not_empty:
            if not self._items and timeout > 0:
                self._not_empty.wait(timeout)
            items = list(self._items)
            self._items.clear()
            self._bytes = 0
            if items:
                self._not_full.notify_all()
            return items


def bundle_fingerprint(path: Path) -> tuple[tuple[str, int, int], ...] | None:
    """Cheap change detector for the model watch job: name, mtime and size of every file in the bundle
    directory. Every file counts, not only the manifest: a bundle copied manifest first is refused while
    its model file is still old or half written, and must be tried again when that file lands."""
    if not (path / "manifest.json").is_file():
        return None
    seen: list[tuple[str, int, int]] = []
    try:
        for f in sorted(path.rglob("*")):
            if f.is_file():
                st = f.stat()
                seen.append((str(f.relative_to(path)), st.st_mtime_ns, st.st_size))
    except OSError:
        return None  # a file vanished while we looked: the copy is still going on
    return tuple(seen)


class Agent:
    """The running agent. `run()` blocks until `stop()` (or a signal) and returns an exit code."""

    def __init__(self, config: AgentConfig, *, sources: list[Source] | None = None) -> None:
        self.config = config
        self.started = time.time()
        self.queue = Inbox(maxsize=100_000)
        self._stop = threading.Event()
        self.notifier = Notifier()

        state_dir = Path(config.gateway.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = state_dir / "edgewatch.db"
        self.db = open_db(self.db_path, synchronous=config.buffer.synchronous)

        # The agent refuses to start without a valid model: scoring garbage is worse than not running.
        in_dir = load_bundle(config.model.path)
        self._bundle_seen = bundle_fingerprint(Path(config.model.path))
        # After a restart during a rollout, resume with the model that was in use (its copy in the
        # state directory) and score the directory's bundle in shadow again.
        self.models = ModelStore(state_dir / "models")
        active = self.models.active() if config.model.shadow_windows > 0 else None
        candidate = None
        if active is not None and active.model_id != in_dir.model_id:
            self.bundle, candidate = active, in_dir
            log.info(
                "resuming with model %s; %s in %s is scored in shadow first",
                active.model_id,
                in_dir.model_id,
                config.model.path,
            )
        else:
            self.bundle = in_dir
            self._keep(in_dir)
        self._rollout: dict[str, Any] | None = None  # the last rollout's outcome, for the status message
        self._probation: tuple[Bundle, int] | None = None  # (previous bundle, windows at promotion)

        # Both connections get the configured durability: the outbox holds what still has to go upstream.
        self.outbox = Outbox(self.db_path, config.uplink, synchronous=config.buffer.synchronous)
        self.uplink: Uplink | None = (
            Uplink(config.uplink, self.outbox, config.gateway.id, self.status)
            if config.uplink.enabled
            else None
        )
        self.console = ConsoleSink() if config.uplink.console else None
        # Its own table in the same database file, with the same durability as the MQTT outbox.
        self.webhook: WebhookSink | None = (
            WebhookSink(config.webhook, self.db_path, synchronous=config.buffer.synchronous)
            if config.webhook.enabled
            else None
        )

        self.settings = StageSettings.from_config(config)
        self.pipeline = build_pipeline(self.settings, self.bundle, self.db, self.emit)
        self.sources = sources if sources is not None else [make_source(s) for s in config.sources]
        self.drift = self._drift_monitor()
        self.commands = self._command_listener()
        if candidate is not None:
            self._start_shadow(candidate, model_stages(self.settings, candidate, self.db))
        self.scheduler = BackgroundScheduler(daemon=True)
        if self.uplink is not None:
            self.resend_last_alerts()

    def resend_last_alerts(self) -> int:
        """Queue again the last alert message of each device (a no-op while it is still in the outbox).

        The alert state commits before its message reaches the outbox (a second connection), so a crash
        between the two would leave an alert the broker never hears of. Re-queueing the newest message
        per device at start closes that gap; if it was delivered already the consumer sees a duplicate
        with the same msg_id, which at-least-once delivery allows (docs/reliability.md)."""
        rows = self.db.execute(
            "SELECT device, payload_json FROM alerts a WHERE updated_ts = "
            "(SELECT max(updated_ts) FROM alerts b WHERE b.device = a.device)"
        ).fetchall()
        sent = 0
        for device, payload_json in rows:
            try:
                payload = json.loads(payload_json)
            except ValueError as exc:
                log.error("alert row of %s has an unreadable payload, not resent: %s", device, exc)
                continue
            sent += int(self.emit_upstream(Event(topic_kind="alert", device=device, payload=payload)))
        return sent

    # -- model --------------------------------------------------------------------------------
    def _drift_monitor(self) -> DriftMonitor | None:
        """The drift check for the current bundle; None (with a warning) when it cannot run.

        A bundle made before bundles carried their training distribution still scores: drift is
        advice about the model, not a reason to stop watching the machine."""
        if not self.config.drift.enabled:
            return None
        try:
            return DriftMonitor(
                self.config.drift, self.bundle.manifest, self.bundle.model_id, self.config.gateway.id
            )
        except ValueError as exc:
            log.warning("drift check off for model %s: %s", self.bundle.model_id, exc)
            return None

    def check_drift(self, now: float | None = None) -> int:
        """Scheduler job (runs in the main loop): compare recent inputs and scores with training.

        `now` (default: the gateway clock) ends the compared period. Returns the number of drift
        messages sent (one per device with readings in the period)."""
        if self.drift is None:
            return 0
        self.pipeline.buffer.flush()  # judge what has arrived, not what was on disk a batch ago
        events = self.drift.events(self.db, time.time() if now is None else now)
        for event in events:
            self.emit(event)
        return len(events)

    def check_model(self, force: bool = False) -> None:
        """Scheduler job (runs in the main loop): swap in a new bundle after it verifies.

        `force` (the reload command) reads the directory even when the manifest looks unchanged."""
        path = Path(self.config.model.path)
        seen = bundle_fingerprint(path)
        if seen is None or (seen == self._bundle_seen and not force):
            return
        try:
            bundle = load_bundle(path)
            stages = model_stages(self.settings, bundle, self.db)
        except (BundleError, OSError, ValueError) as exc:
            log.error("new model bundle in %s refused, keeping %s: %s", path, self.bundle.model_id, exc)
            self._bundle_seen = seen  # do not retry the same broken files every interval
            return
        if bundle.model_id == self.bundle.model_id:
            self._bundle_seen = seen
            return  # the same bundle (e.g. files touched, or a reload without a change)
        try:
            bundle = self.models.snapshot(bundle)  # the files as verified, for restarts and rollbacks
        except (BundleError, OSError) as exc:
            log.warning("new model bundle in %s not taken yet: %s", path, exc)
            return  # not marked seen: the next interval tries again
        self._bundle_seen = seen
        if self.config.model.shadow_windows == 0:
            self.pipeline.buffer.flush()
            prime_windower(stages[1], self.pipeline.buffer)
            self._promote(bundle, stages)
            return
        self._start_shadow(bundle, stages)

    def _keep(self, bundle: Bundle) -> None:
        """Record the bundle in use in the state directory (a copy; a full disk only costs the copy)."""
        try:
            self.models.activate(self.models.snapshot(bundle))
        except (BundleError, OSError) as exc:
            log.warning("could not keep a copy of model %s in the state directory: %s", bundle.model_id, exc)

    def _start_shadow(self, bundle: Bundle, stages: tuple[Any, Any, Any]) -> None:
        n = self.config.model.shadow_windows
        self.pipeline.buffer.flush()
        prime_windower(stages[1], self.pipeline.buffer)
        if self.pipeline.shadow is not None:
            log.info("shadow model %s replaced by %s", self.pipeline.shadow.model_id, bundle.model_id)
        self.pipeline.shadow = Shadow(bundle, stages, n, self.pipeline.buffer)
        log.info(
            "model %s verified: scoring in shadow beside %s for %d windows",
            bundle.model_id,
            self.bundle.model_id,
            n,
        )

    def _promote(self, bundle: Bundle, stages: tuple[Any, Any, Any]) -> None:
        """Make `bundle` the scoring model; the previous one is kept for a probation period."""
        self.pipeline.buffer.flush()
        self.pipeline.thresholder.save()
        previous = self.bundle
        self.pipeline.swap_scorer(*stages)
        self.pipeline.alerts.channel_norm = channel_norm(bundle) or {}
        log.info("model swapped: %s -> %s", previous.model_id, bundle.model_id)
        self.bundle = bundle
        self.drift = self._drift_monitor()
        self._keep(bundle)
        if self.config.model.shadow_windows > 0:
            self._probation = (previous, self.pipeline.stats.windows)

    def _rollout_step(self) -> None:
        """After each input: decide a shadow that is done; end a probation that went well."""
        shadow = self.pipeline.shadow
        if shadow is not None and shadow.done:
            self.pipeline.shadow = None
            self._rollout = report = shadow.report()
            agreement, floor = shadow.agreement, self.config.model.min_agreement
            if shadow.error is not None:
                report["result"] = "failed"
            elif agreement == agreement and agreement < floor:  # NaN (nothing compared) does not refuse
                report["result"] = "refused"
                log.error(
                    "shadow model %s not promoted: it agreed with %s on %.1f %% of %d windows (< %.1f %%); "
                    'lower [model] min_agreement and send {"type": "reload"} to try it again',
                    shadow.model_id,
                    self.bundle.model_id,
                    100 * agreement,
                    shadow.compared,
                    100 * floor,
                )
            else:
                report["result"] = "promoted"
                log.info(
                    "shadow model %s promoted after %d windows: %s", shadow.model_id, shadow.windows, report
                )
                self._promote(shadow.bundle, (shadow.scorer, shadow.windower, shadow.thresholder))
            metrics.MODEL_ROLLOUTS.labels(report["result"]).inc()
            metrics.SHADOW_WINDOWS.set(0)
        if self._probation is not None:
            _, at = self._probation
            if self.pipeline.stats.windows - at >= self.config.model.shadow_windows:
                self._probation = None
                log.info(
                    "model %s confirmed: no error in its first %d windows",
                    self.bundle.model_id,
                    self.config.model.shadow_windows,
                )

    def _rollback(self, why: str) -> None:
        """A freshly promoted model failed: score with the previous one again."""
        previous, _ = self._probation  # type: ignore[misc]
        self._probation = None
        failed = self.bundle.model_id
        stages = model_stages(self.settings, previous, self.db)
        self.pipeline.buffer.flush()
        prime_windower(stages[1], self.pipeline.buffer)
        self.pipeline.swap_scorer(*stages)
        self.pipeline.alerts.channel_norm = channel_norm(previous) or {}
        self.bundle = previous
        self.drift = self._drift_monitor()
        self._keep(previous)
        self._rollout = {"shadow_model_id": failed, "result": "rolled_back", "error": why[:300]}
        metrics.MODEL_ROLLOUTS.labels("rolled_back").inc()
        log.error(
            "model %s failed after its promotion, rolled back to %s: %s", failed, previous.model_id, why
        )

    # -- commands -----------------------------------------------------------------------------
    def _command_listener(self) -> MqttSource | None:
        """A subscriber to <prefix>/<gateway>/cmd on the upstream broker, with its own persistent
        session so commands sent while the gateway was offline arrive when it is back."""
        cfg = self.config
        if not (cfg.uplink.enabled and cfg.commands.enabled):
            return None
        sub = MqttSourceConfig(
            type="mqtt",
            name="commands",
            mqtt=cfg.uplink.mqtt,
            client_id=cfg.commands.client_id or f"edgewatch-{cfg.gateway.id}-cmd",
        )
        topic = f"{cfg.uplink.topic_prefix.rstrip('/')}/{topic_level(cfg.gateway.id)}/cmd"
        return MqttSource(sub, topic=topic)

    def _command_sink(self, msg: RawMessage) -> None:
        # Commands run in the main loop, like every other change to pipeline state.
        self.queue.put(lambda: self.handle_command(msg.payload, msg.origin))

    def handle_command(self, payload: bytes, origin: str = "cmd") -> str:
        """Validate and carry out one command; returns the result ('ok' or a refusal reason).

        A refused command is counted by reason and logged (at most 200 characters of detail, never
        the payload itself), and changes nothing."""
        kind = "unknown"
        try:
            cmd = parse_command(payload, self.config.commands.max_bytes)
            kind = cmd.type
            if isinstance(cmd, LabelCommand):
                rec = store_label(self.db, cmd)
                log.info("label %s on alert %s of %s (%s)", cmd.label, cmd.alert_id, rec["device"], origin)
            elif isinstance(cmd, ReloadCommand):
                log.info("reload requested (%s)", origin)
                self.check_model(force=True)
            elif isinstance(cmd, DriftResetCommand):
                n = self.drift.forget_reference(self.db, time.time(), cmd.device) if self.drift else 0
                log.info("drift reference reset for %s: %d device(s)", cmd.device or "every device", n)
        except CommandError as exc:
            metrics.COMMANDS.labels(kind, exc.reason).inc()
            log.warning("command on %s refused: %s: %s", origin, exc.reason, exc.detail[:200])
            return exc.reason
        metrics.COMMANDS.labels(kind, "ok").inc()
        return "ok"

    # -- outputs ------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        if self.console is not None:
            self.console(event)
        self.emit_upstream(event)
        if self.webhook is not None:
            self.webhook.enqueue(event)  # kinds not in [webhook] kinds are skipped there

    def emit_upstream(self, event: Event) -> bool:
        """Into the outbox (False: uplink disabled, or the outbox dropped or could not store it)."""
        return self.uplink.enqueue(event) if self.uplink is not None else False

    def status(self) -> dict[str, Any]:
        """Body of the retained status message (the uplink adds envelope fields)."""
        return {
            "version": __version__,
            "model_id": self.bundle.model_id,
            "uptime_s": round(time.time() - self.started, 1),
            "outbox": {"depth": self.outbox.depth(), "dropped": self.outbox.dropped()},
            "devices": self.pipeline.windower.devices(),
            "rollout": self.pipeline.shadow.report() if self.pipeline.shadow is not None else self._rollout,
        }

    # -- loop ---------------------------------------------------------------------------------
    def submit(self, task: Task) -> None:
        """Run `task` in the main loop (used by scheduler jobs)."""
        try:
            self.queue.put_nowait(task)
        except queue.Full:
            log.warning("main queue full; periodic task skipped")

    def _sink(self, msg: RawMessage) -> None:
        # Blocks the source thread when the pipeline falls behind: back-pressure, not silent loss.
        self.queue.put(msg)

    def _sink_many(self, msgs: list[RawMessage]) -> None:
        """A source's whole network read in one hand-off (blocks like `_sink` when full)."""
        self.queue.put_many(msgs)

    def _schedule(self) -> None:
        sc = self.config.scheduler
        add = self.scheduler.add_job
        add(lambda: self.submit(self._flush), "interval", seconds=self.config.buffer.flush_interval_s)
        add(lambda: self.submit(lambda: self.pipeline.tick(time.time())), "interval", seconds=1)
        add(lambda: self.submit(self._retention), "interval", seconds=sc.retention_interval_s)
        add(lambda: self.submit(self._log_progress), "interval", seconds=sc.status_interval_s)
        add(lambda: self.submit(self.pipeline.thresholder.save), "interval", seconds=sc.flush_interval_s)
        add(lambda: self.submit(self.check_model), "interval", seconds=self.config.model.watch_interval_s)
        if self.config.drift.enabled:
            add(lambda: self.submit(self.check_drift), "interval", seconds=self.config.drift.interval_s)
        if self.uplink is not None:
            add(lambda: self.submit(self.uplink.publish_status), "interval", seconds=sc.status_interval_s)

    def _log_progress(self) -> None:
        """A periodic one-line summary, so a log reader sees the agent working between alerts."""
        st = self.pipeline.stats
        rejected = sum(st.rejected.values())
        by_reason = f" {dict(sorted(st.rejected.items()))}" if rejected else ""
        log.info(
            "readings accepted %d, rejected %d%s, windows scored %d (%d over threshold), outbox %d",
            st.accepted,
            rejected,
            by_reason,
            st.windows,
            st.anomalous_windows,
            self.outbox.depth(),
        )

    def _flush(self) -> None:
        """Buffered rows, and events the outbox could not store (disk full), go to SQLite."""
        self.pipeline.buffer.flush()
        if self.uplink is not None and self.uplink.held:
            self.uplink.retry_held()

    def _retention(self) -> None:
        self.pipeline.buffer.apply_retention(time.time())
        self.outbox.expire(time.time())

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        if self.config.metrics.enabled:
            from prometheus_client import start_http_server

            start_http_server(
                self.config.metrics.port, addr=self.config.metrics.host, registry=metrics.REGISTRY
            )
        if self.uplink is not None:
            self.uplink.start()
        if self.webhook is not None:
            self.webhook.start()
        if self.commands is not None:
            self.commands.start(self._command_sink)
        for source in self.sources:
            source.start(self._sink, self._sink_many)
        self._schedule()
        self.scheduler.start()
        log.info(
            "edgewatch %s running: gateway %s, model %s, %d source(s)",
            __version__,
            self.config.gateway.id,
            self.bundle.model_id,
            len(self.sources),
        )
        self.notifier.ready(f"model {self.bundle.model_id}")
        try:
            while not self._stop.is_set():
                # Everything waiting at once; idle, the loop still turns twice a second (watchdog).
                for item in self.queue.take(timeout=0.5):
                    self._handle(item)
                self.notifier.watchdog()
        finally:
            self.shutdown()
        return 0

    def _handle(self, item: RawMessage | Task) -> None:
        try:
            if isinstance(item, RawMessage):
                # Per reading: a failure in one reading of a batch payload is handled (rolled back,
                # logged) before the next one, as if each reading had come in its own message.
                self.pipeline.process_raw(item, on_error=self._failed)
            else:
                item()
        except Exception as exc:
            self._failed(exc, type(item).__name__)
        if self.pipeline.shadow is not None or self._probation is not None:
            self._rollout_step()

    def _failed(self, exc: Exception, what: str = "RawMessage") -> None:
        """A reading or job raised: a new model that fails to score is rolled back; anything else is
        logged and counted, and the loop goes on (one bad input or job must not take the gateway down)."""
        if isinstance(exc, ScoringError):
            if self._probation is not None:
                self._rollback(str(exc))
                return
            log.error("error while scoring", exc_info=exc)
        else:
            log.error("error while processing %s", what, exc_info=exc)
        metrics.DB_ERRORS.labels("pipeline").inc()

    def shutdown(self) -> None:
        """Stop sources first, finish what is queued, persist state, then let the uplink drain."""
        self.notifier.stopping()
        for source in [*self.sources, *([self.commands] if self.commands is not None else [])]:
            try:
                source.stop()
            except Exception:
                log.exception("stopping source %s", getattr(source, "name", source))
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        while items := self.queue.take(timeout=0):
            for item in items:
                self._handle(item)
        self.pipeline.buffer.flush()
        self.pipeline.thresholder.save()
        self.pipeline.alerts.save()
        if self.uplink is not None:
            self.uplink.flush(timeout=self.config.uplink.shutdown_flush_s)
            self.uplink.stop()
        if self.webhook is not None:
            self.webhook.flush(timeout=self.config.webhook.shutdown_flush_s)
            self.webhook.stop()
        self.db.conn.close()
        log.info("edgewatch stopped")


def run_from_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # one line per job run is noise
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    for w in warnings_for(config):
        log.warning("config: %s", w)
    try:
        agent = Agent(config)
    except BundleError as exc:
        log.error("cannot start without a valid model bundle: %s", exc)
        return 3
    return agent.run()
