"""Webhook sink: events POSTed as JSON to an HTTP(S) endpoint, with the outbox guarantees of the uplink.

An event is written to the `webhook_outbox` table (same Outbox class as MQTT, its own caps and drop
counters) before anything goes on the network, and deleted only when the endpoint answered 2xx. One
worker thread sends the oldest row, one at a time, so delivery is in order per device (per gateway, in
fact): a row that has to be retried holds back the rows behind it rather than let them overtake it.

- connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and jitter; a
  Retry-After header is honoured (capped at `backoff_max_s`);
- any other status (3xx, 4xx) is permanent: resending the same request cannot succeed, and retrying it
  forever would block every later event, so the row is dropped, counted as `http_<status>` and logged;
- every POST carries the event's `msg_id` (header `Idempotency-Key`, and in the body), so a receiver
  drops the duplicates that at-least-once delivery allows (docs/webhook.md).

Rows hold the event payload (the MQTT bytes); the template is applied at send time, so the secret (a
bearer token or the PagerDuty routing key, read from an env var or a systemd credential) is never
stored in the database and never logged. Only the standard library's http.client is used, and
redirects are not followed (a POST turned into a GET by a redirect would be lost silently).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent import __version__, metrics
from agent.mqtt_client import SecretError, is_loopback, read_credential, read_env_secret
from agent.types import Event
from agent.uplink import HeldPuts, Outbox, OutboxMessage, OutboxRow, encode_payload

log = logging.getLogger(__name__)

TABLE = "webhook_outbox"
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
WEBHOOK_KINDS = ("alert", "health", "drift")
Kind = Literal["alert", "health", "drift"]
Template = Literal["raw", "slack", "pagerduty"]
IDLE_WAIT_S = 1.0  # longest idle sleep of the worker; enqueue wakes it at once
EXPIRE_EVERY_S = 60.0
FAIL_LOG_EVERY_S = 300.0  # a failing endpoint is logged once, then at most this often
RESPONSE_READ_BYTES = 64 * 1024  # of a response body read at most (only a snippet is logged)
RESPONSE_LOG_CHARS = 200
ROUTING_KEY_PLACEHOLDER = "r" * 32  # PagerDuty routing keys are 32 characters: sizes the body at enqueue
PD_SUMMARY_MAX = 1024  # PagerDuty Events API v2 limit
SLACK_HEADER_MAX = 150  # Slack block kit limits
SLACK_FIELD_MAX = 2000
SLACK_TEXT_MAX = 3000


# -- configuration ----------------------------------------------------------------------------------


def endpoint_of(url: str) -> str:
    """scheme://host[:port] of `url`, for logs: the path and query may be a secret (Slack webhook URLs)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def check_url(url: str) -> str:
    """`url` if it is an absolute http(s) URL a POST can go to; ValueError naming the problem otherwise.

    The messages never repeat the path or query (they may be the secret)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"webhook url must start with http:// or https:// (got scheme {parts.scheme!r})")
    if not parts.hostname:
        raise ValueError(f"webhook url {parts.scheme}://...: no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "webhook url must not carry user:password@ (it would be logged and stored); "
            "use token_env or token_credential"
        )
    try:
        parts.port  # noqa: B018  (raises ValueError for a port outside 0-65535 or not a number)
    except ValueError as exc:
        raise ValueError(f"webhook url {endpoint_of(url)}: invalid port ({exc})") from None
    if parts.fragment:
        raise ValueError(f"webhook url {endpoint_of(url)}: a #fragment is never sent; remove it")
    if any(c.isspace() for c in url.strip()):
        raise ValueError(f"webhook url {endpoint_of(url)}: contains whitespace")
    return url.strip()


class WebhookConfig(BaseModel):
    """Where alerts are POSTed as JSON, in which shape, and how much may wait while the endpoint is away."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="POST events to the webhook endpoint")
    url: str | None = Field(
        None,
        description="Endpoint, http:// or https://. Default for template = 'pagerduty': the Events API v2 "
        "URL. A Slack webhook URL is itself a secret: prefer url_env or url_credential",
    )
    url_env: str | None = Field(None, description="Name of the environment variable holding the URL")
    url_credential: str | None = Field(
        None, description="File name under $CREDENTIALS_DIRECTORY (systemd LoadCredential=) holding the URL"
    )
    template: Template = Field(
        "raw",
        description="Body shape: 'raw' (the MQTT payload as is), 'slack' (incoming-webhook message with "
        "blocks) or 'pagerduty' (Events API v2: trigger/resolve with dedup_key)",
    )
    kinds: list[Kind] = Field(
        default_factory=lambda: ["alert"],
        min_length=1,
        description="Event kinds to send: any of 'alert', 'health', 'drift'",
    )
    token_env: str | None = Field(
        None,
        description="Environment variable holding the secret: sent as 'Authorization: Bearer' (raw, slack) "
        "or as the routing_key in the body (pagerduty)",
    )
    token_credential: str | None = Field(
        None, description="Systemd credential name holding the secret (instead of token_env)"
    )
    timeout_s: float = Field(
        10.0, gt=0, le=300, description="Connect and read timeout per request (per socket operation)"
    )
    max_payload_bytes: int = Field(
        64 * 1024,
        ge=512,
        le=4 * 1024 * 1024,
        description="Largest request body; a bigger event is dropped (reason 'payload_too_large')",
    )
    max_rows: int = Field(10_000, ge=1, description="Webhook outbox cap in messages")
    max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Webhook outbox cap in stored payload bytes (16 MiB default)"
    )
    max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Messages older than this are dropped unsent (reason 'expired')"
    )
    drop_policy: Literal["drop_oldest", "reject_new"] = Field(
        "drop_oldest",
        description="When a cap is reached: delete the oldest messages to make room, or refuse the new one",
    )
    backoff_min_s: float = Field(1.0, gt=0, description="First retry delay in seconds (doubles each try)")
    backoff_max_s: float = Field(
        300.0, gt=0, description="Longest retry delay in seconds; also caps a server's Retry-After"
    )
    backoff_jitter: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Random +- fraction applied to each retry delay (only upwards for Retry-After)",
    )
    shutdown_flush_s: float = Field(
        5.0, ge=0, description="At shutdown, wait this long for the webhook outbox to drain"
    )

    @field_validator("kinds")
    @classmethod
    def _unique_kinds(cls, kinds: list[str]) -> list[str]:
        return list(dict.fromkeys(kinds))

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str | None) -> str | None:
        return None if url is None else check_url(url)

    @model_validator(mode="after")
    def _check(self) -> WebhookConfig:
        n_url = sum(x is not None for x in (self.url, self.url_env, self.url_credential))
        if n_url > 1:
            raise ValueError("give at most one of url, url_env, url_credential")
        if self.enabled and n_url == 0 and self.template != "pagerduty":
            raise ValueError("webhook enabled but no endpoint: set url, url_env or url_credential")
        if self.token_env is not None and self.token_credential is not None:
            raise ValueError("give at most one of token_env, token_credential")
        if self.enabled and self.template == "pagerduty" and not self.has_token:
            raise ValueError("template 'pagerduty' needs the routing key: set token_env or token_credential")
        if self.url is not None:
            self._check_token_transport(self.url)
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s must be >= backoff_min_s")
        return self

    @property
    def has_token(self) -> bool:
        return self.token_env is not None or self.token_credential is not None

    def _check_token_transport(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if self.has_token and parts.scheme == "http" and not is_loopback(host):
            raise ValueError(
                f"the token would cross the network to {host} in clear text: use an https:// url "
                "(plain http with a token is allowed only to an endpoint on this machine)"
            )

    def resolve_url(self) -> str:
        """The endpoint from wherever it is configured; SecretError (a ValueError) if unreadable."""
        if self.url_env is not None:
            url, where = read_env_secret(self.url_env), f"env var {self.url_env}"
        elif self.url_credential is not None:
            url, where = read_credential(self.url_credential), f"credential {self.url_credential!r}"
        elif self.url is not None:
            url, where = self.url, "url"
        elif self.template == "pagerduty":
            url, where = PAGERDUTY_URL, "url"
        else:
            raise SecretError("no webhook endpoint configured (url, url_env or url_credential)")
        try:
            url = check_url(url)
            self._check_token_transport(url)
        except ValueError as exc:
            raise SecretError(f"{where}: {exc}") from None
        return url

    @property
    def url_is_secret(self) -> bool:
        """The URL comes from an env var or credential: its path and query are kept out of the logs."""
        return self.url_env is not None or self.url_credential is not None

    def resolve_token(self) -> str | None:
        if self.token_env is not None:
            return read_env_secret(self.token_env)
        if self.token_credential is not None:
            return read_credential(self.token_credential)
        return None

    def check_secrets(self) -> list[str]:
        """Problems resolving the URL and token here and now (for `config check`); empty if all fine."""
        problems = []
        for resolve in (self.resolve_url, self.resolve_token):
            try:
                resolve()
            except SecretError as exc:
                problems.append(str(exc))
        return problems


# -- templates --------------------------------------------------------------------------------------


def _num(value: Any) -> str:
    """A number for people (3 significant digits). Missing or non-finite shows as 'n/a', never as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    f = float(value)
    return f"{f:.3g}" if math.isfinite(f) else "n/a"


def _when(ts: Any) -> str:
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        return "n/a"
    return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _top_sensors(payload: Mapping[str, Any]) -> str:
    parts = []
    for item in payload.get("top_sensors") or []:
        share = item.get("share") if isinstance(item, Mapping) else None
        ok = isinstance(share, int | float) and not isinstance(share, bool) and math.isfinite(share)
        pct = f"{100 * share:.0f} %" if ok else "n/a"
        parts.append(f"{item.get('channel', '?') if isinstance(item, Mapping) else '?'} {pct}")
    return ", ".join(parts) or "none"


def _s(payload: Mapping[str, Any], key: str, default: str = "?") -> str:
    value = payload.get(key)
    return default if value is None else str(value)


def summary(kind: str, payload: Mapping[str, Any]) -> str:
    """One line a person reads first (Slack notification text, PagerDuty summary)."""
    device = _s(payload, "device")
    state = _s(payload, "state")
    if kind == "alert":
        word = {"open": "opened", "update": "update", "resolve": "resolved"}.get(state, state)
        return (
            f"[{_s(payload, 'severity')}] {device}: anomaly {word}, score {_num(payload.get('score'))} "
            f"vs threshold {_num(payload.get('threshold'))}; top sensors {_top_sensors(payload)}"
        )
    if kind == "health":
        channel = payload.get("channel")
        where = f" on {channel}" if channel else ""
        return f"{device}: sensor {_s(payload, 'kind')}{where} {state}: {_s(payload, 'detail', '')}"
    drifted = payload.get("drifted") or []
    return f"{device}: drift check {state}" + (f" ({', '.join(map(str, drifted))})" if drifted else "")


def _slack_escape(text: str) -> str:
    """Slack mrkdwn treats &, < and > as control characters (links, mentions)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fields(kind: str, payload: Mapping[str, Any]) -> list[tuple[str, str]]:
    common = [("Device", _s(payload, "device")), ("State", _s(payload, "state"))]
    if kind == "alert":
        return [
            *common,
            ("Severity", _s(payload, "severity")),
            ("Score / threshold", f"{_num(payload.get('score'))} / {_num(payload.get('threshold'))}"),
            ("Peak", _num(payload.get("peak"))),
            ("Top sensors", _top_sensors(payload)),
            ("Model", _s(payload, "model_id")),
        ]
    if kind == "health":
        return [
            *common,
            ("Kind", _s(payload, "kind")),
            ("Channel", _s(payload, "channel", "all")),
            ("Count", _s(payload, "count")),
            ("Detail", _s(payload, "detail", "")),
        ]
    score = payload.get("score")
    ratio = score.get("ratio") if isinstance(score, Mapping) else None
    return [
        *common,
        ("Drifted", ", ".join(map(str, payload.get("drifted") or [])) or "none"),
        ("Score ratio", _num(ratio)),
        ("Model", _s(payload, "model_id")),
    ]


def slack_body(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message: notification `text` plus header, fields and a context line that
    carries the msg_id (Slack has no idempotency of its own; a receiver behind it can use it)."""
    title = {"alert": "anomaly", "health": "sensor health", "drift": "drift"}.get(kind, kind)
    header = f"{_s(payload, 'device')}: {title} {_s(payload, 'state')}"
    context = (
        f"gateway `{_s(payload, 'gateway')}` · msg_id `{_s(payload, 'msg_id')}` · {_when(payload.get('ts'))}"
    )
    return {
        "text": _clip(_slack_escape(summary(kind, payload)), SLACK_TEXT_MAX),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": _clip(header, SLACK_HEADER_MAX)}},
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": _clip(f"*{name}*\n{_slack_escape(value)}", SLACK_FIELD_MAX)}
                    for name, value in _fields(kind, payload)
                ],
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _slack_escape(context)}]},
        ],
    }


def pagerduty_body(kind: str, payload: Mapping[str, Any], routing_key: str) -> dict[str, Any] | None:
    """PagerDuty Events API v2: `trigger` while an alert (health event, drift) is active, `resolve` when
    it ends, with a dedup_key that stays the same for its whole life. None: nothing to tell PagerDuty
    (a drift check still learning)."""
    state = payload.get("state")
    msg_id = _s(payload, "msg_id", "")
    if kind == "alert":
        dedup_key = _s(payload, "alert_id", msg_id.split(":")[0])
        action = "resolve" if state == "resolve" else "trigger"
        severity = payload.get("severity") if payload.get("severity") in ("warning", "critical") else "error"
        pd_class = "anomaly"
    elif kind == "health":
        dedup_key = _s(payload, "event_id", msg_id.split(":")[0])
        action = "resolve" if state == "cleared" else "trigger"
        severity, pd_class = "warning", f"sensor_{_s(payload, 'kind')}"
    else:
        if state not in ("drifted", "stable"):
            return None
        dedup_key = f"drift:{_s(payload, 'gateway')}:{_s(payload, 'device')}"
        action = "trigger" if state == "drifted" else "resolve"
        severity, pd_class = "info", "drift"
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key,
        "client": "edgewatch",
    }
    if action == "trigger":  # PagerDuty reads a payload only on trigger
        body["payload"] = {
            "summary": _clip(summary(kind, payload), PD_SUMMARY_MAX),
            "source": f"{_s(payload, 'gateway')}/{_s(payload, 'device')}",
            "severity": severity,
            "timestamp": _when(payload.get("ts")),
            "component": _s(payload, "device"),
            "group": _s(payload, "gateway"),
            "class": pd_class,
            "custom_details": dict(payload),  # includes msg_id, model_id, score, threshold, top_sensors
        }
        if body["payload"]["timestamp"] == "n/a":
            del body["payload"]["timestamp"]
    return body


def render(
    template: str, kind: str, payload: Mapping[str, Any], routing_key: str | None = None
) -> bytes | None:
    """The request body for one event under `template`; None when the template does not send it.

    raw is byte for byte the MQTT payload. NaN and infinities become null (JSON has none), never 0."""
    if template == "raw":
        return encode_payload(payload)
    if template == "slack":
        return encode_payload(slack_body(kind, payload))
    if template == "pagerduty":
        body = pagerduty_body(kind, payload, routing_key or "")
        return None if body is None else encode_payload(body)
    raise ValueError(f"unknown webhook template {template!r} (expected raw, slack or pagerduty)")


# -- retry rules ------------------------------------------------------------------------------------


def is_retryable(status: int) -> bool:
    """408, 429 and 5xx can succeed later; every other non-2xx answer would be the same next time."""
    return status in (408, 429) or 500 <= status <= 599


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP-date); None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def backoff_delay(streak: int, lo: float, hi: float, jitter: float) -> float:
    """Exponential backoff: lo doubling per consecutive failure up to hi, randomised by +- jitter so a
    fleet of gateways does not retry in lockstep after the endpoint comes back."""
    base = min(hi, lo * 2 ** min(max(streak, 1) - 1, 30))
    return max(0.0, base * (1 + random.uniform(-jitter, jitter)))


# -- the sink ---------------------------------------------------------------------------------------


class WebhookSink:
    """Durable queue + one worker thread POSTing its rows in order; see the module docstring.

    `enqueue` runs in the caller's thread and only touches the outbox; the worker owns the network.
    A stopped sink is finished (its outbox connection is closed): make a new one on the same database to
    send what is left, as the next agent start does.
    """

    def __init__(self, config: WebhookConfig, db_path: str | Path, synchronous: str = "NORMAL") -> None:
        self.config = config
        self.outbox = Outbox(db_path, config, synchronous=synchronous, table=TABLE)
        self.held = HeldPuts(self.outbox, TABLE)  # what the outbox could not store yet (disk full)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._fail_streak = 0
        self._last_fail_log = -math.inf
        self._next_expire = 0.0
        self._secrets: tuple[str, ...] = ()  # what _redact removes from anything logged

    def accepts(self, event: Event) -> bool:
        return event.topic_kind in self.config.kinds

    def depth(self) -> int:
        return self.outbox.depth()

    def enqueue(self, event: Event) -> bool:
        """Store an event for delivery; True if it is queued (or already was, same msg_id).

        False when it is not sent: a kind not in `kinds`, an event the template does not send (PagerDuty:
        a drift check still learning), over `max_payload_bytes` (counted), dropped by the caps
        (counted); or held in memory because the disk is full (logged; written by the worker once it can). Raises ValueError for an event without a msg_id,
        as the uplink does, so the bug shows at its source."""
        if not self.accepts(event):
            return False
        msg_id = event.payload.get("msg_id")
        if not isinstance(msg_id, str) or not msg_id:
            raise ValueError(
                f"{event.topic_kind} event for {event.device!r} has no msg_id: {event.payload!r}"
            )
        body = render(self.config.template, event.topic_kind, event.payload, ROUTING_KEY_PLACEHOLDER)
        if body is None:
            log.debug(
                "webhook: template %s does not send %s %s", self.config.template, event.topic_kind, msg_id
            )
            return False
        if len(body) > self.config.max_payload_bytes:
            log.error(
                "webhook: %s %s dropped: its %s body is %d bytes, over max_payload_bytes = %d",
                event.topic_kind,
                msg_id,
                self.config.template,
                len(body),
                self.config.max_payload_bytes,
            )
            try:
                self.outbox.count_dropped("payload_too_large")
            except sqlite3.Error as exc:  # disk full: the drop is logged above, not persisted
                metrics.DB_ERRORS.labels(TABLE).inc()
                log.error("webhook outbox: could not count the drop: %s", exc)
            return False
        msg = OutboxMessage(msg_id, event.topic_kind, encode_payload(event.payload), device=event.device)
        stored = self.held.put(msg, what=event.topic_kind)  # None: held in memory (disk full)
        if stored:
            self._wake.set()
        return bool(stored)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("webhook sink already started")
        if self._stopping.is_set():
            raise RuntimeError("webhook sink was stopped; create a new one")
        self._thread = threading.Thread(target=self._run, name="edgewatch-webhook", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (a request in flight may take up to timeout_s) and close the outbox.

        Rows not yet acknowledged with 2xx stay in the database for the next sink."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(max(timeout, self.config.timeout_s) + 1.0)
            if thread.is_alive():  # it still uses the outbox: leave the connection open
                log.warning("webhook worker did not stop within %.1f s", max(timeout, self.config.timeout_s))
                return
        self.outbox.close()

    def flush(self, timeout: float) -> bool:
        """Wait until the webhook outbox is empty (everything answered 2xx or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth() > 0:
            if time.monotonic() >= deadline or (self._thread is None or not self._thread.is_alive()):
                return False
            time.sleep(0.01)
        return True

    # -- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._maybe_expire()
                if self.held:  # events the disk could not take: written once it can
                    self.held.retry()
                rows = self.outbox.peek(1)
            except sqlite3.Error as exc:
                metrics.DB_ERRORS.labels(TABLE).inc()
                log.error("webhook outbox: read failed: %s", exc)
                self._stopping.wait(self.config.backoff_max_s)
                continue
            if not rows:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                delay = self._attempt(rows[0])
            except sqlite3.Error as exc:  # the row stays; it is tried again (a duplicate at worst)
                metrics.DB_ERRORS.labels(TABLE).inc()
                log.error("webhook outbox: write failed: %s", exc)
                delay = self.config.backoff_max_s
            except Exception:
                log.exception("webhook: unexpected error; retrying with backoff")
                self._fail_streak += 1
                delay = self._backoff()
            if delay is not None:
                self._stopping.wait(delay)  # new events do not cut a backoff short; stop does

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_EVERY_S
            self.outbox.expire(time.time())

    def _backoff(self) -> float:
        c = self.config
        return backoff_delay(self._fail_streak, c.backoff_min_s, c.backoff_max_s, c.backoff_jitter)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "********")
        return text

    def _log_failure(self, what: str) -> None:
        now = time.monotonic()
        what = self._redact(what)
        if self._fail_streak <= 1 or now - self._last_fail_log > FAIL_LOG_EVERY_S:
            log.warning(
                "webhook: %s (webhook outbox depth %d); retrying with backoff", what, self.outbox.depth()
            )
            self._last_fail_log = now
        else:
            log.debug("webhook: %s", what)

    def _attempt(self, row: OutboxRow) -> float | None:
        """Send one row. None: it is settled (delivered or dropped), go on; a number: wait, then retry."""
        try:
            url = self.config.resolve_url()
            token = self.config.resolve_token()
        except SecretError as exc:  # configuration, not this message: keep it and retry
            self._fail_streak += 1
            self._log_failure(f"cannot send: {exc}")
            return self._backoff()
        parts = urlsplit(url)
        url_parts = (parts.path, parts.query) if self.config.url_is_secret else ()
        self._secrets = tuple(s for s in (token, *url_parts) if s and len(s) > 1)
        endpoint = endpoint_of(url)
        try:
            body = render(self.config.template, row.topic, json.loads(row.payload), token)
        except (ValueError, TypeError) as exc:  # unreadable row or a payload the template cannot take
            self._drop(row, "unrenderable", f"cannot render it as {self.config.template}: {exc}")
            return None
        if body is None:
            self._drop(row, "not_sent", f"template {self.config.template} does not send it")
            return None
        if len(body) > self.config.max_payload_bytes:
            self._drop(row, "payload_too_large", f"{len(body)} bytes > max_payload_bytes")
            return None
        self.outbox.mark_sent([row.id])
        try:
            status, reason, headers, text = self._post(url, body, row.msg_id, token)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS, bad response
            metrics.WEBHOOK_DELIVERIES.labels("retried").inc()
            self._fail_streak += 1
            self._log_failure(
                f"POST {row.topic} {row.msg_id} to {endpoint} failed: {type(exc).__name__}: {exc}"
            )
            return self._backoff()
        if 200 <= status <= 299:
            self.outbox.ack(row.id)
            metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
            if self._fail_streak:
                log.info("webhook: %s answers again (after %d failed attempts)", endpoint, self._fail_streak)
            self._fail_streak = 0
            return None
        snippet = self._redact(text.decode("utf-8", "replace")[:RESPONSE_LOG_CHARS].replace("\n", " "))
        if is_retryable(status):
            metrics.WEBHOOK_DELIVERIES.labels("retried").inc()
            self._fail_streak += 1
            self._log_failure(
                f"{endpoint} answered {status} {reason} to {row.topic} {row.msg_id}: {snippet!r}"
            )
            retry_after = parse_retry_after(headers.get("Retry-After"))
            if retry_after is None:
                return self._backoff()
            wait = min(retry_after, self.config.backoff_max_s)
            return wait * (1 + random.uniform(0, self.config.backoff_jitter))  # never earlier than asked
        metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
        hint = " (redirects are not followed: configure the final URL)" if 300 <= status <= 399 else ""
        self._drop(
            row,
            f"http_{status}",
            f"{endpoint} answered {status} {reason}{hint}; not retried, the same request would fail again; "
            f"response: {snippet!r}",
        )
        return None

    def _drop(self, row: OutboxRow, reason: str, why: str) -> None:
        self.outbox.discard([row.id], reason)
        log.error(
            "webhook: %s %s (device %s) dropped, reason %s: %s",
            row.topic,
            row.msg_id,
            row.device,
            reason,
            self._redact(why),
        )

    def _post(self, url: str, body: bytes, msg_id: str, token: str | None) -> tuple[int, str, Message, bytes]:
        """One POST on a fresh connection (no keep-alive: a stale pooled connection would look like an
        outage). TLS verifies the server certificate and host name against the system CAs."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        timeout = self.config.timeout_s
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, parts.port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"edgewatch/{__version__}",
            "Idempotency-Key": msg_id,
        }
        if token is not None and self.config.template != "pagerduty":
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read(RESPONSE_READ_BYTES)
            return resp.status, resp.reason, resp.headers, text
        finally:
            conn.close()
