"""Uplink: a durable SQLite outbox drained to an MQTT broker with QoS 1.

Stages hand `Event`s to `Uplink.enqueue`; they are written to the `outbox` table first and deleted only
when the broker acknowledged them (PUBACK), so a broker outage, a network cut or an agent restart loses
nothing that fits inside the caps. Delivery is at-least-once: after a reconnect or a restart every
unacknowledged message is sent again, so consumers drop duplicates by `msg_id` (docs/mqtt.md).

Threads: `enqueue` / `publish_status` run in the caller's thread and only touch the outbox (its own
SQLite connection behind a lock) or hand a status body over; one uplink thread owns the paho client,
drives its network loop, publishes and deletes acknowledged rows. The uplink thread sleeps in a select()
on the broker socket and a wake-up socketpair, so `enqueue` (or a status, flush or stop) gets it
publishing at once instead of after its next poll. Each connection uses a fresh client,
so the last will carries the figures of that connect and paho's in-memory session never competes with
the outbox as the source of truth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import select
import socket
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

import numpy as np
import paho.mqtt.client as mqtt
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict, Field

from agent import __version__, metrics
from agent.db import open_db
from agent.mqtt_client import MqttConnectionConfig, SecretError, Will, make_client
from agent.types import Event

log = logging.getLogger(__name__)

MAX_HELD = 1000  # messages held in memory while the outbox cannot be written (disk full), then dropped
DROPPED_COUNTER = "outbox_dropped"  # row name in `counters`: total drops, persisted across restarts
# Tables an Outbox may drain (created by agent/db.py migrations) with the depth gauge and drop counter of
# each. The name goes into SQL text, so only these are accepted.
OUTBOX_TABLES: dict[str, tuple[Gauge, PromCounter]] = {
    "outbox": (metrics.OUTBOX_DEPTH, metrics.OUTBOX_DROPPED),
    "webhook_outbox": (metrics.WEBHOOK_OUTBOX_DEPTH, metrics.WEBHOOK_OUTBOX_DROPPED),
}
TOPIC_KINDS = ("alert", "health", "status", "drift")
# Longest sleep of the uplink thread with nothing to do: new work wakes it at once (see Uplink._kick), so
# this only paces paho's keepalive bookkeeping and retries after a refused publish.
IDLE_WAIT_S = 0.5


class UplinkConfig(BaseModel):
    """Where and how events go upstream, and how much the outbox may hold while the broker is away."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Send events upstream over MQTT; false keeps only the console sink"
    )
    mqtt: MqttConnectionConfig = Field(
        default_factory=MqttConnectionConfig,
        description="Upstream broker connection (address, auth, TLS, reconnect_min_s/reconnect_max_s backoff)",
    )
    client_id: str | None = Field(
        None, description="MQTT client id; default 'edgewatch-<gateway id>' so it is stable across restarts"
    )
    topic_prefix: str = Field(
        "edgewatch",
        min_length=1,
        pattern=r"^[^#+\x00]+$",
        description="First topic level(s): <prefix>/<gateway>/<device>/<kind>; no MQTT wildcards",
    )
    qos: Literal[1] = Field(1, description="MQTT QoS for every message; 1 = at least once (PUBACK deletes)")
    max_inflight: int = Field(
        20, ge=1, le=1000, description="Messages published but not yet acknowledged by the broker at once"
    )
    max_rows: int = Field(
        100_000, ge=1, description="Outbox cap in messages; the drop policy applies beyond it"
    )
    max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Outbox cap in payload bytes (64 MiB default)"
    )
    max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Messages older than this are dropped unsent (reason 'expired')"
    )
    drop_policy: Literal["drop_oldest", "reject_new"] = Field(
        "drop_oldest",
        description="When a cap is reached: delete the oldest messages to make room, or refuse the new one",
    )
    reconnect_jitter: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Random +- fraction applied to each reconnect delay (mqtt.reconnect_min_s doubling up "
        "to mqtt.reconnect_max_s) so a fleet of gateways does not reconnect in lockstep",
    )
    shutdown_flush_s: float = Field(
        5.0, ge=0, description="At shutdown, wait this long for the outbox to drain before disconnecting"
    )
    console: bool = Field(
        False, description="Also print every event as one compact JSON line on stdout (demo)"
    )


# -- payload encoding -------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Plain JSON types only: numpy scalars/arrays unwrapped, NaN and +-inf become null (JSON has no NaN)."""
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON. Non-finite floats are sent as null; anything not JSON-able raises TypeError."""
    return json.dumps(
        _json_safe(payload), separators=(",", ":"), allow_nan=False, ensure_ascii=False
    ).encode()


def topic_level(name: str) -> str:
    """`name` made safe as one topic level: '/', '+', '#' and NUL become '_' (a device may be '/dev/ttyS0')."""
    safe = name.translate({ord("/"): "_", ord("+"): "_", ord("#"): "_", 0: "_"})
    return safe or "_"


class ConsoleSink:
    """Prints each event's payload as one compact JSON line, the same bytes the broker would get (demo)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def __call__(self, event: Event) -> None:
        stream = self.stream or sys.stdout
        stream.write(encode_payload(event.payload).decode() + "\n")
        stream.flush()


# -- outbox -----------------------------------------------------------------------------------------


class OutboxCaps(Protocol):
    max_rows: int
    max_bytes: int
    max_age_s: float
    drop_policy: str


@dataclass(frozen=True, slots=True)
class Caps:
    """Outbox limits when no UplinkConfig is at hand (tests, tools)."""

    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0
    drop_policy: str = "drop_oldest"


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One message ready for the wire."""

    msg_id: str
    topic: str
    payload: bytes
    device: str | None = None
    retain: bool = False
    qos: int = 1


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    msg_id: str
    device: str | None
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float
    attempts: int


class Outbox:
    """Durable FIFO of messages waiting for a broker acknowledgement, with caps and a drop policy.

    Use one Outbox per database file and table: it keeps the row and byte totals in memory (computed at
    open) so a put into a full outbox does not scan the table. All methods are thread-safe (one
    connection, a lock). `table` picks one of OUTBOX_TABLES ("outbox" for MQTT, "webhook_outbox" for the
    webhook sink); drops are counted as `<table>_dropped` in `counters` and in that table's metrics.
    """

    def __init__(
        self,
        db_path: str | Path,
        caps: OutboxCaps | None = None,
        synchronous: str = "NORMAL",
        table: str = "outbox",
    ) -> None:
        self.caps: OutboxCaps = caps or Caps()
        if self.caps.drop_policy not in ("drop_oldest", "reject_new"):
            raise ValueError(
                f"drop_policy must be 'drop_oldest' or 'reject_new', not {self.caps.drop_policy!r}"
            )
        if table not in OUTBOX_TABLES:
            raise ValueError(f"unknown outbox table {table!r} (expected one of {', '.join(OUTBOX_TABLES)})")
        self.table = table
        self.counter = f"{table}_dropped"  # "outbox_dropped" (DROPPED_COUNTER) for the MQTT outbox
        self._depth_metric, self._dropped_metric = OUTBOX_TABLES[table]
        self._db = open_db(db_path, synchronous=synchronous)
        self._conn = self._db.conn
        self._lock = threading.RLock()
        rows, size = self._conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM {table}"
        ).fetchone()
        self._rows, self._bytes = int(rows), int(size)
        self._depth_metric.set(self._rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # A transaction that rolls back on any error, so caps, rows and counters change together or not at all.
    def _write(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn()
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    self._conn.execute("ROLLBACK")
                raise
            return result

    def _count_drops(self, reason: str, n: int) -> None:
        """Inside a transaction: add `n` drops to the persisted total and to `<counter>.<reason>`
        (the Prometheus counter is bumped after the commit)."""
        self._conn.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [(self.counter, n), (f"{self.counter}.{reason}", n)],
        )

    def put(self, msg: OutboxMessage, now: float | None = None) -> bool:
        """Store `msg`; True if it is in the outbox afterwards (a msg_id already there is a no-op, True).

        False when it was dropped: bigger than max_bytes on its own ('too_large'), or the outbox is full
        under reject_new ('rejected'). Under drop_oldest the oldest rows are deleted ('evicted') instead.
        """
        now = time.time() if now is None else now
        size = len(msg.payload)
        drops: list[tuple[str, int]] = []

        def txn() -> bool:
            exists = self._conn.execute(
                f"SELECT 1 FROM {self.table} WHERE msg_id = ?", (msg.msg_id,)
            ).fetchone()
            if exists:
                return True
            if size > self.caps.max_bytes:
                drops.append(("too_large", 1))
            elif self._rows + 1 > self.caps.max_rows or self._bytes + size > self.caps.max_bytes:
                if self.caps.drop_policy == "reject_new":
                    drops.append(("rejected", 1))
                else:
                    self._evict(
                        need_rows=self._rows + 1 - self.caps.max_rows,
                        need_bytes=self._bytes + size - self.caps.max_bytes,
                        drops=drops,
                    )
            if drops and drops[-1][0] != "evicted":
                self._count_drops(drops[-1][0], 1)
                return False
            self._conn.execute(
                f"INSERT INTO {self.table} (msg_id, device, topic, payload, qos, retain, created) "
                "VALUES (?,?,?,?,?,?,?)",
                (msg.msg_id, msg.device, msg.topic, msg.payload, msg.qos, int(msg.retain), now),
            )
            self._rows += 1
            self._bytes += size
            return True

        rows_before, bytes_before = self._rows, self._bytes
        try:
            stored = self._write(txn)
        except BaseException:
            self._rows, self._bytes = rows_before, bytes_before
            raise
        for reason, n in drops:
            self._dropped_metric.labels(reason).inc(n)
        self._depth_metric.set(self._rows)
        return stored

    def _evict(self, need_rows: int, need_bytes: int, drops: list[tuple[str, int]]) -> None:
        """Inside put's transaction: delete the oldest rows until `need_rows` and `need_bytes` are freed."""
        freed_rows = freed_bytes = 0
        last_id = None
        for row_id, length in self._conn.execute(f"SELECT id, LENGTH(payload) FROM {self.table} ORDER BY id"):
            if freed_rows >= need_rows and freed_bytes >= need_bytes:
                break
            last_id = row_id
            freed_rows += 1
            freed_bytes += length
        if last_id is None:
            return
        self._conn.execute(f"DELETE FROM {self.table} WHERE id <= ?", (last_id,))
        self._rows -= freed_rows
        self._bytes -= freed_bytes
        self._count_drops("evicted", freed_rows)
        drops.append(("evicted", freed_rows))

    def peek(self, n: int, after_id: int = 0) -> list[OutboxRow]:
        """Up to `n` rows with id > after_id in id order (insertion order, so per-device order holds)."""
        with self._lock:
            cur = self._conn.execute(
                f"SELECT id, msg_id, device, topic, payload, qos, retain, created, attempts FROM {self.table} "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, n),
            )
            return [
                OutboxRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], bool(r[6]), r[7], r[8])
                for r in cur.fetchall()
            ]

    def mark_sent(self, row_ids: list[int]) -> None:
        """Count a publish attempt (attempts > 1 on a delivered row means the consumer may see a duplicate)."""
        if not row_ids:
            return
        marks = ",".join("?" * len(row_ids))
        self._write(
            lambda: self._conn.execute(
                f"UPDATE {self.table} SET attempts = attempts + 1 WHERE id IN ({marks})", row_ids
            )
        )

    def ack(self, row_id: int) -> bool:
        """Delete a row the broker acknowledged; False if it was already gone (evicted or expired)."""
        return self.ack_many([row_id]) == 1

    def ack_many(self, row_ids: list[int]) -> int:
        """Delete acknowledged rows in one transaction (one commit per network read, not per message)."""
        return self._delete(row_ids, drop_reason=None)

    def expire(self, now: float | None = None) -> int:
        """Drop rows older than max_age_s (reason 'expired'); returns how many."""
        now = time.time() if now is None else now
        cutoff = now - self.caps.max_age_s

        def txn() -> int:
            n, size = self._conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM {self.table} WHERE created < ?",
                (cutoff,),
            ).fetchone()
            if n:
                self._conn.execute(f"DELETE FROM {self.table} WHERE created < ?", (cutoff,))
                self._count_drops("expired", n)
                self._rows -= n
                self._bytes -= size
            return int(n)

        n = self._write(txn)
        if n:
            self._dropped_metric.labels("expired").inc(n)
            self._depth_metric.set(self._rows)
            log.warning(
                "%s: %d message(s) older than %.0f s dropped unsent", self.table, n, self.caps.max_age_s
            )
        return n

    def discard(self, row_ids: list[int], reason: str) -> int:
        """Delete rows that can never be delivered (e.g. the webhook endpoint refused them for good),
        counting them as drops of `reason` in the same transaction; returns how many were still there."""
        return self._delete(row_ids, drop_reason=reason)

    def _delete(self, row_ids: list[int], drop_reason: str | None) -> int:
        """Delete rows by id in one transaction (counted as drops of `drop_reason` unless None)."""
        if not row_ids:
            return 0
        marks = ",".join("?" * len(row_ids))

        def txn() -> tuple[int, int]:
            n, size = self._conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM {self.table} WHERE id IN ({marks})",
                row_ids,
            ).fetchone()
            if n:
                self._conn.execute(f"DELETE FROM {self.table} WHERE id IN ({marks})", row_ids)
                if drop_reason is not None:
                    self._count_drops(drop_reason, n)
            return int(n), int(size)

        with self._lock:
            n, size = self._write(txn)
            self._rows -= n
            self._bytes -= size
            self._depth_metric.set(self._rows)
        if n and drop_reason is not None:
            self._dropped_metric.labels(drop_reason).inc(n)
        return n

    def count_dropped_metric(self, reason: str, n: int = 1) -> None:
        """Only the Prometheus counter, for a drop that cannot be persisted yet (disk full)."""
        self._dropped_metric.labels(reason).inc(n)

    def count_dropped(self, reason: str, n: int = 1, metric: bool = True) -> None:
        """Count `n` messages dropped before they reached the table (e.g. over a payload bound).
        `metric=False`: the Prometheus counter was bumped already, when the drop happened."""
        self._write(lambda: self._count_drops(reason, n))
        if metric:
            self._dropped_metric.labels(reason).inc(n)

    def depth(self) -> int:
        with self._lock:
            return self._rows

    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def dropped_by_reason(self) -> dict[str, int]:
        """Persisted drops per reason (evicted, rejected, too_large, expired)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, value FROM counters WHERE substr(name, 1, ?) = ?",
                (len(self.counter) + 1, f"{self.counter}."),
            ).fetchall()
        return {name.split(".", 1)[1]: int(value) for name, value in rows}

    def dropped(self) -> int:
        """All drops ever (persisted in `counters`, so the figure survives restarts)."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM counters WHERE name = ?", (self.counter,)).fetchone()
            return int(row[0]) if row else 0


class HeldPuts:
    """Puts into an Outbox that survive a full disk: a message the outbox cannot store (SQLite error)
    is logged, counted and held in memory, and later messages queue behind it, so order per device
    holds; `retry()` (and every later put) writes them once the database takes writes again. Past
    `limit` held messages the oldest is dropped and counted (reason 'disk_full'). Thread-safe."""

    def __init__(self, outbox: Outbox, kind: str, limit: int = MAX_HELD) -> None:
        self.outbox = outbox
        self.kind = kind  # edgewatch_db_errors_total label
        self.limit = limit
        self._held: deque[OutboxMessage] = deque()
        self.unpersisted_drops = 0  # dropped here and not yet added to the outbox's persisted counters
        self._last_stored = True  # the outcome of the newest put that reached the outbox
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def put(self, msg: OutboxMessage, what: str = "message") -> bool | None:
        """True: in the outbox now. False: the outbox's caps dropped it. None: held in memory."""
        with self._lock:
            if self._held:  # behind what waits already
                self._hold(msg)
                self._retry_locked()
                return None if any(m is msg for m in self._held) else self._last_stored
            try:
                return self.outbox.put(msg)
            except sqlite3.Error as exc:
                metrics.DB_ERRORS.labels(self.kind).inc()
                log.error(
                    "%s: could not store %s %s: %s; held in memory until it can",
                    self.kind,
                    what,
                    msg.msg_id,
                    exc,
                )
                self._hold(msg)
                return None

    def retry(self) -> bool:
        """Write held messages while the outbox takes them; True if any was written."""
        with self._lock:
            return self._retry_locked()

    def _hold(self, msg: OutboxMessage) -> None:
        self._held.append(msg)
        if len(self._held) > self.limit:
            self._held.popleft()
            self.unpersisted_drops += 1
            self.outbox.count_dropped_metric("disk_full")

    def _retry_locked(self) -> bool:
        if self.unpersisted_drops:  # persisted once the database takes writes again
            try:
                self.outbox.count_dropped("disk_full", self.unpersisted_drops, metric=False)
            except sqlite3.Error:
                return False
            self.unpersisted_drops = 0
        written = False
        while self._held:
            try:
                self._last_stored = self.outbox.put(self._held[0])
            except sqlite3.Error:
                break
            self._held.popleft()
            written = True
        if written and not self._held:
            log.info("%s: the messages held in memory are stored again", self.kind)
        return written


# -- uplink -----------------------------------------------------------------------------------------


class Uplink:
    """Drains the outbox to the broker: in order, at most max_inflight unacknowledged, deletes on PUBACK.

    `status_provider` returns the body of the status message (version, model_id, uptime_s, outbox,
    devices; missing keys get defaults). It is only called from the threads that call `start()` and
    `publish_status()`; the uplink thread reuses the last body (with fresh outbox figures) for the
    online status at each connect and for the last will.
    """

    def __init__(
        self,
        config: UplinkConfig,
        outbox: Outbox,
        gateway_id: str,
        status_provider: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        if not gateway_id:
            raise ValueError("gateway_id must not be empty")
        self.config = config
        self.outbox = outbox
        self.gateway_id = gateway_id
        self.status_provider = status_provider
        self.client_id = config.client_id or f"edgewatch-{gateway_id}"
        prefix = config.topic_prefix.rstrip("/")
        self._base = f"{prefix}/{topic_level(gateway_id)}"
        self.status_topic = f"{self._base}/status"
        self._started = time.time()

        self._lock = threading.Lock()
        self._status_body: dict[str, Any] = {}
        self._status_body_at = self._started
        self._status_pending: bytes | None = None  # newest status waiting for the uplink thread
        self._wake = threading.Event()  # there is work for the uplink thread (new rows, status, stop)
        # A byte on _wake_w ends the uplink thread's select() early; created by start(), closed by stop().
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self._stop_timeout = 5.0

        # Owned by the uplink thread.
        self._client: mqtt.Client | None = None
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._acked: list[int] = []  # row ids acknowledged during the current network read
        self._status_mids: set[int] = set()
        self._cursor = 0  # highest row id published on this connection
        self._caught_up = False  # the last peek found nothing more to send
        self._lost = False
        self._fail_streak = 0
        self._last_fail_log = 0.0
        self._next_expire = 0.0
        self.held = HeldPuts(outbox, "outbox")  # what the outbox could not store yet (disk full)

    # -- topics and payloads --------------------------------------------------------------------
    def topic_for(self, event: Event) -> str:
        if event.topic_kind not in TOPIC_KINDS:
            raise ValueError(
                f"unknown topic_kind {event.topic_kind!r} (expected one of {', '.join(TOPIC_KINDS)})"
            )
        if event.topic_kind == "status":
            return self.status_topic
        if not event.device:
            raise ValueError(f"a {event.topic_kind} event needs a device for its topic")
        return f"{self._base}/{topic_level(event.device)}/{event.topic_kind}"

    def enqueue(self, event: Event) -> bool:
        """Persist an event for delivery; True if it is in the outbox now.

        False if the outbox dropped it (caps), or could not store it: then (SQLite error, e.g. disk
        full) it is held in memory, in order, and written by the next `enqueue` or `retry_held` that
        finds space; beyond MAX_HELD held messages the oldest is dropped and counted ('disk_full').
        Raises ValueError for an event that can never be sent (unknown kind, no device, no msg_id), so
        the bug shows at its source. A status event is not queued: it replaces the pending status.
        """
        topic = self.topic_for(event)
        msg_id = event.payload.get("msg_id")
        if not isinstance(msg_id, str) or not msg_id:
            raise ValueError(
                f"{event.topic_kind} event for {event.device!r} has no msg_id: {event.payload!r}"
            )
        payload = encode_payload(event.payload)
        if event.topic_kind == "status":
            self._hand_over_status(payload)
            return True
        msg = OutboxMessage(msg_id, topic, payload, device=event.device)
        stored = self.held.put(msg, what=event.topic_kind)
        if stored:
            self._kick()
        return bool(stored)

    def retry_held(self) -> int:
        """Write held messages (disk full) into the outbox while it takes them; how many are still held.
        Called by the agent's flush job, so they go out when space returns even if no event comes."""
        if self.held.retry():
            self._kick()
        return len(self.held)

    def _refresh_status_body(self) -> None:
        if self.status_provider is None:
            return
        try:
            body = dict(self.status_provider())
        except Exception:
            log.exception("status provider failed; the status message uses the previous body")
            return
        with self._lock:
            self._status_body, self._status_body_at = body, time.time()

    def status_payload(self, state: str, now: float | None = None) -> dict[str, Any]:
        """The status message per docs/mqtt.md, from the last provider body plus live outbox figures."""
        now = time.time() if now is None else now
        with self._lock:
            body, body_at = dict(self._status_body), self._status_body_at
        uptime = body.get("uptime_s")
        uptime = (
            (float(uptime) + (now - body_at)) if isinstance(uptime, int | float) else (now - self._started)
        )
        return {
            "v": 1,
            "type": "status",
            "msg_id": f"status:{self.gateway_id}:{int(now * 1000)}",
            "gateway": self.gateway_id,
            "state": state,
            "ts": now,
            "version": str(body.get("version", __version__)),
            "model_id": body.get("model_id"),
            "uptime_s": round(max(uptime, 0.0), 3),
            "outbox": {
                "depth": self.outbox.depth(),
                "dropped": self.outbox.dropped() + self.held.unpersisted_drops,
            },
            "devices": sorted(str(d) for d in body.get("devices", [])),
            "rollout": body.get("rollout"),
        }

    def publish_status(self) -> None:
        """Heartbeat: send a fresh retained online status. Never blocks; while offline the next connect
        sends its own fresh status instead (a stale status is worthless)."""
        self._refresh_status_body()
        self._hand_over_status(encode_payload(self.status_payload("online")))

    def _hand_over_status(self, payload: bytes) -> None:
        with self._lock:
            self._status_pending = payload
        self._kick()

    def _kick(self) -> None:
        """Flag work for the uplink thread and end its select() now (any thread; never blocks)."""
        self._wake.set()
        w = self._wake_w
        if w is not None:
            # Full buffer: a wake-up is already pending. Closed by a concurrent stop(): nobody to wake.
            with contextlib.suppress(OSError):
                w.send(b"\0")

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("uplink already started")
        self._refresh_status_body()
        self._stopping.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="edgewatch-uplink", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish a retained offline status (waits up to `timeout` for its PUBACK), then disconnect.

        Unacknowledged outbox rows stay in the outbox and are sent again by the next start."""
        if self._thread is None:
            return
        self._stop_timeout = timeout
        self._stopping.set()
        self._kick()
        self._thread.join(timeout + 2.0)
        if self._thread.is_alive():
            log.warning("uplink thread did not stop within %.1f s", timeout + 2.0)
        else:  # a thread still running may still select() on the pair: leave it open then
            wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, None, None
            for sock in (wake_w, wake_r):
                if sock is not None:
                    sock.close()
        self._thread = None

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (everything acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth() > 0:
            if time.monotonic() >= deadline:
                return False
            self._kick()
            time.sleep(0.01)
        return True

    # -- the uplink thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._session()
            except Exception:
                log.exception("uplink: unexpected error; reconnecting")
            finally:
                self._commit_acks()
                self._drop_client()
            if self._stopping.is_set():
                break
            self._fail_streak += 1
            self._stopping.wait(self._backoff(self._fail_streak))

    def _backoff(self, streak: int) -> float:
        conn = self.config.mqtt
        base = min(conn.reconnect_max_s, conn.reconnect_min_s * 2 ** min(streak - 1, 30))
        j = self.config.reconnect_jitter
        return max(0.0, base * (1 + random.uniform(-j, j)))

    def _log_failure(self, what: str) -> None:
        now = time.monotonic()
        if self._fail_streak == 0 or now - self._last_fail_log > 300:
            log.warning("uplink: %s (outbox depth %d); retrying with backoff", what, self.outbox.depth())
            self._last_fail_log = now
        else:
            log.debug("uplink: %s", what)

    def _session(self) -> None:
        """One connection: connect, publish until it drops or we stop."""
        self._maybe_expire()
        will = Will(self.status_topic, encode_payload(self.status_payload("offline")), qos=1, retain=True)
        try:
            client = make_client(self.config.mqtt, self.client_id, clean_start=True, will=will)
        except (SecretError, OSError, ValueError) as exc:  # missing secret, unreadable TLS file
            self._log_failure(f"cannot build the MQTT client: {exc}")
            return
        # paho's own window (20) is fixed once connect_async ran; beyond it paho queues, so the flow
        # stays in order and our max_inflight is what bounds unacknowledged messages.
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client, self._inflight, self._status_mids = client, {}, set()
        self._cursor, self._lost, self._caught_up = 0, False, False
        conn = self.config.mqtt
        try:
            client.reconnect()  # connect_async (in make_client) stored the address; this opens the socket
        except (OSError, ValueError) as exc:
            self._log_failure(f"cannot connect to {conn.host}:{conn.effective_port}: {exc}")
            return
        while not self._lost:
            if self._stopping.is_set():
                self._goodbye(client)
                return
            rc = self._loop_once(client, IDLE_WAIT_S)
            self._commit_acks()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self._lost = True
                break
            if self._connected.is_set():
                self._send_status(client)
                woke = self._wake.is_set()
                self._wake.clear()
                if woke or not self._caught_up:
                    self._pump(client)
                self._maybe_expire()
        self._log_failure(f"connection to {conn.host}:{conn.effective_port} lost")

    def _loop_once(self, client: mqtt.Client, timeout: float) -> mqtt.MQTTErrorCode:
        """Wait up to `timeout` for broker traffic or a wake-up, then run one paho loop step (no wait).

        paho's own select() cannot see our wake-up socket, so the waiting happens here; paho's loop then
        reads, writes and does its keepalive bookkeeping as usual."""
        wake = self._wake_r
        if wake is None:  # not started through start() (no wake-up pair): paho's own wait
            return client.loop(timeout=min(timeout, 0.05))
        sock = client.socket()
        # An SSL socket may hold decrypted bytes select() cannot see: then do not wait (as paho does).
        pending = sock.pending() if sock is not None and hasattr(sock, "pending") else 0
        if sock is not None and not pending:
            wlist = [sock] if client.want_write() else []
            # A closed or broken socket: paho's loop below reports it.
            with contextlib.suppress(OSError, ValueError, TypeError):
                select.select([sock, wake], wlist, [], timeout)
            with contextlib.suppress(OSError):  # BlockingIOError once drained
                while wake.recv(4096):
                    pass
        return client.loop(timeout=0)

    def _drop_client(self) -> None:
        sock = self._client.socket() if self._client is not None else None
        if sock is not None:  # no DISCONNECT here: after an error the broker should publish the will
            with contextlib.suppress(OSError):
                sock.close()
        self._client = None
        self._inflight = {}
        self._connected.clear()
        metrics.UPLINK_CONNECTED.set(0)

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now >= self._next_expire:
            self._next_expire = now + 60.0
            try:
                self.outbox.expire(time.time())
            except sqlite3.Error as exc:
                metrics.DB_ERRORS.labels("outbox").inc()
                log.error("outbox: expire failed: %s", exc)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any
    ) -> None:
        if reason_code.is_failure:
            self._log_failure(f"broker refused the connection: {reason_code}")
            self._lost = True
            return
        log.info(
            "uplink: connected to %s:%d as %s",
            self.config.mqtt.host,
            self.config.mqtt.effective_port,
            self.client_id,
        )
        self._fail_streak = 0
        self._connected.set()
        metrics.UPLINK_CONNECTED.set(1)
        # A fresh online status on every connect replaces the retained offline (will) message.
        self._hand_over_status(encode_payload(self.status_payload("online")))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any
    ) -> None:
        self._lost = True
        self._connected.clear()
        metrics.UPLINK_CONNECTED.set(0)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, props: Any) -> None:
        row_id = self._inflight.pop(mid, None)
        if row_id is None:
            self._status_mids.discard(mid)
            return
        if getattr(reason_code, "is_failure", False):  # MQTT 5 broker said no: keep the row, resend later
            log.warning("uplink: broker rejected row %d: %s", row_id, reason_code)
            return
        self._acked.append(row_id)  # deleted in one transaction after this network read (_commit_acks)

    def _commit_acks(self) -> None:
        acked, self._acked = self._acked, []
        if not acked:
            return
        try:
            self.outbox.ack_many(acked)
        except sqlite3.Error as exc:  # the rows stay; they are resent after the next reconnect (duplicates)
            metrics.DB_ERRORS.labels("outbox").inc()
            log.error("outbox: could not delete %d acknowledged row(s): %s", len(acked), exc)
            return
        metrics.UPLINK_PUBLISHED.inc(len(acked))

    def _send_status(self, client: mqtt.Client) -> None:
        with self._lock:
            payload, self._status_pending = self._status_pending, None
        if payload is not None:
            info = client.publish(self.status_topic, payload, qos=1, retain=True)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self._status_mids.add(info.mid)

    def _pump(self, client: mqtt.Client) -> None:
        room = self.config.max_inflight - len(self._inflight)
        if room <= 0:
            return
        rows = self.outbox.peek(room, after_id=self._cursor)
        self._caught_up = len(rows) < room
        sent: list[int] = []
        for row in rows:
            info = client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            self._inflight[info.mid] = row.id
            self._cursor = row.id
            sent.append(row.id)
        self.outbox.mark_sent(sent)

    def _goodbye(self, client: mqtt.Client) -> None:
        """Clean shutdown: retained offline status (best effort, bounded wait), then DISCONNECT."""
        timeout = self._stop_timeout
        if self._connected.is_set():
            info = client.publish(
                self.status_topic, encode_payload(self.status_payload("offline")), qos=1, retain=True
            )
            deadline = time.monotonic() + timeout
            while (
                info.rc == mqtt.MQTT_ERR_SUCCESS and not info.is_published() and time.monotonic() < deadline
            ):
                if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
            if not info.is_published():
                log.warning("uplink: offline status not acknowledged within %.1f s", timeout)
        client.disconnect()
        for _ in range(5):  # let paho write the DISCONNECT packet
            if client.loop(timeout=0.01) != mqtt.MQTT_ERR_SUCCESS:
                break
