"""The agent's SQLite database: connection settings and a registry of schema migrations.

Every schema change is a new function decorated with ``@migration``; never edit an applied one.
`open_db` applies whatever is missing, in order, inside one transaction each, and records it in
``_migrations`` so an old database upgrades in place on start-up.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = []


def migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    """Register a migration; its function name is its permanent id."""
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE readings (
            device TEXT NOT NULL,
            ts REAL NOT NULL,
            seq INTEGER,
            received REAL,
            values_json TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_readings_device_ts ON readings(device, ts)")
    db.execute("CREATE INDEX idx_readings_ts ON readings(ts)")
    db.execute(
        """CREATE TABLE scores (
            device TEXT NOT NULL,
            start_ts REAL NOT NULL,
            end_ts REAL NOT NULL,
            error REAL NOT NULL,
            threshold REAL,
            anomalous INTEGER NOT NULL,
            channel_errors_json TEXT NOT NULL,
            model_id TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_scores_device_ts ON scores(device, end_ts)")
    db.execute(
        """CREATE TABLE alerts (
            alert_id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            opened_ts REAL NOT NULL,
            updated_ts REAL NOT NULL,
            resolved_ts REAL,
            peak REAL,
            payload_json TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_alerts_device_state ON alerts(device, state)")
    db.execute(
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            msg_id TEXT NOT NULL UNIQUE,
            device TEXT,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL DEFAULT 1,
            retain INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute(
        """CREATE TABLE state (
            key TEXT PRIMARY KEY,
            value_json TEXT NOT NULL,
            updated REAL NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )"""
    )


@migration
def m002_labels(db: sqlite_utils.Database) -> None:
    """Analysts' verdicts on alerts (the feedback loop): one row per alert, the latest verdict wins.

    The alert's device and span are copied in, so a label keeps its meaning after retention has
    deleted the alert row."""
    db.execute(
        """CREATE TABLE labels (
            alert_id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            label TEXT NOT NULL,
            note TEXT,
            author TEXT,
            opened_ts REAL NOT NULL,
            resolved_ts REAL,
            model_id TEXT,
            labelled REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_labels_device ON labels(device, opened_ts)")


@migration
def m003_webhook_outbox(db: sqlite_utils.Database) -> None:
    """The webhook sink's durable queue (agent/webhook.py): the same columns as `outbox`, so the same
    Outbox class drains it; `topic` holds the event kind (alert, health, drift)."""
    db.execute(
        """CREATE TABLE webhook_outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            msg_id TEXT NOT NULL UNIQUE,
            device TEXT,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL DEFAULT 1,
            retain INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0
        )"""
    )


def open_db(path: str | Path, synchronous: str = "NORMAL") -> sqlite_utils.Database:
    """Open (creating if needed) and migrate the database.

    WAL lets the uplink thread read the outbox while the pipeline writes. ``synchronous=NORMAL`` in WAL
    survives an application crash but a power loss may roll back the last commits; FULL syncs each
    commit (see docs/reliability.md).
    """
    path = Path(path)
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA foreign_keys=ON")
    migrate(db)
    return db


def applied_migrations(db: sqlite_utils.Database) -> list[str]:
    if "_migrations" not in db.table_names():
        return []
    return [row[0] for row in db.execute("SELECT name FROM _migrations ORDER BY applied, name").fetchall()]


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations in registry order; return the names applied now."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
    done = set(applied_migrations(db))
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            db.execute("INSERT INTO _migrations (name, applied) VALUES (?, ?)", [name, time.time()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied


def state_row(key: str, value: object) -> dict[str, object]:
    """A row of the `state` table (key -> JSON), for thresholds, alerts and other resumable state."""
    return {"key": key, "value_json": json.dumps(value), "updated": time.time()}


_UPSERT_SQL: dict[tuple[str, tuple[str, ...], str], str] = {}


def upsert_rows(db: sqlite_utils.Database, table: str, rows: list[dict[str, object]], pk: str) -> None:
    """Insert `rows`, or update the given columns of the row with the same `pk`: what
    ``db[table].upsert_all(rows, pk=pk)`` leaves in the table, as cached ``INSERT ... ON CONFLICT``.

    For the hot writers (alert state after every alert event): sqlite-utils' upsert reads the schema
    (table names, columns) on every call, ~10x the cost of the write itself. Rows are whole rows (every
    NOT NULL column given; unlike sqlite-utils, no partial updates), keys = columns of the existing
    `table`, whose primary key is `pk`.
    """
    for row in rows:
        cols = tuple(row)
        key = (table, cols, pk)
        sql = _UPSERT_SQL.get(key)
        if sql is None:
            names = ", ".join(f'"{c}"' for c in cols)
            sets = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c != pk)
            action = f"UPDATE SET {sets}" if sets else "NOTHING"
            sql = (
                f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" * len(cols))}) '
                f'ON CONFLICT("{pk}") DO {action}'
            )
            _UPSERT_SQL[key] = sql
        db.conn.execute(sql, tuple(row.values()))


def read_state(db: sqlite_utils.Database, prefix: str) -> list[tuple[str, str]]:
    """(key without `prefix`, JSON text) of every `state` row whose key starts with `prefix`."""
    rows = db.execute(
        "SELECT key, value_json FROM state WHERE substr(key, 1, ?) = ?", [len(prefix), prefix]
    ).fetchall()
    return [(key[len(prefix) :], value) for key, value in rows]
