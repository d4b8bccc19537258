"""Inbound commands on `<prefix>/<gateway>/cmd`: analysts' labels, model reload, drift reset.

The command topic is the one way into a running gateway from upstream, so it accepts only what is
documented here (schemas/command.json is generated from these models; a test keeps it so): a payload
larger than `max_bytes`, not UTF-8 JSON, of an unknown type, with a missing, extra or malformed field,
is refused with a reason, counted, logged, and changes nothing. Nothing in a command is executed,
evaluated or used as a path.

A label copies the alert's device and span into the `labels` table (migration m002), so
`edgewatch export --labels` can turn the verdicts into a training set after the alert rows are gone.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

import sqlite_utils
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

LABELS = ("true_positive", "false_positive", "maintenance")
_TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"  # printable text (tabs and newlines allowed)


class CommandConfig(BaseModel):
    """[commands]: the inbound command topic, on the upstream broker of [uplink.mqtt]."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="Subscribe to <uplink.topic_prefix>/<gateway id>/cmd (QoS 1, persistent session) on "
        "the upstream broker; needs the uplink enabled.",
    )
    client_id: str | None = Field(
        None,
        description="Fixed MQTT client id of the command subscriber (its persistent session keeps commands "
        "sent while the gateway is offline). Default: edgewatch-<gateway id>-cmd.",
    )
    max_bytes: int = Field(
        4096, ge=256, le=65536, description="Larger command payloads are refused unread (reason too_large)."
    )


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = Field(1, description="Command format version.")
    msg_id: str | None = Field(
        None, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$", description="Sender's id, echoed in the log."
    )


class LabelCommand(_Base):
    """An analyst's verdict on an alert."""

    type: Literal["label"]
    alert_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="The alert's alert_id (16 hex digits).")
    label: Literal["true_positive", "false_positive", "maintenance"] = Field(
        description="true_positive: a real fault; false_positive: normal operation the model did not "
        "know; maintenance: work on the machine (neither normal nor a fault)."
    )
    note: str | None = Field(None, max_length=1000, pattern=_TEXT, description="Free text.")
    author: str | None = Field(None, max_length=64, pattern=_TEXT, description="Who labelled it.")


class ReloadCommand(_Base):
    """Check the model directory now and swap in a new bundle if it verifies."""

    type: Literal["reload"]


class DriftResetCommand(_Base):
    """Forget a device's drift reference (after maintenance or a recalibration): learnt anew."""

    type: Literal["drift_reset"]
    device: str | None = Field(
        None, min_length=1, max_length=128, pattern=_TEXT, description="The device; absent: every device."
    )


Command = Annotated[LabelCommand | ReloadCommand | DriftResetCommand, Field(discriminator="type")]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


class CommandError(Exception):
    """A refused command: `reason` is a short code (metrics label), `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_command(payload: bytes, max_bytes: int = 4096) -> Command:
    """One command from raw bytes; CommandError (never another exception) when it is not acceptable."""
    if len(payload) > max_bytes:
        raise CommandError("too_large", f"{len(payload)} bytes, at most {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError("not_utf8", str(exc)) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CommandError("not_json", str(exc)[:200]) from None
    if not isinstance(data, dict):
        raise CommandError("invalid", f"a command is a JSON object, got {type(data).__name__}")
    if data.get("type") not in ("label", "reload", "drift_reset"):
        raise CommandError(
            "unknown_type", f"type {str(data.get('type'))[:40]!r} (label, reload, drift_reset)"
        )
    try:
        return COMMAND_ADAPTER.validate_python(data)
    except ValidationError as exc:
        parts = [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'command'}: {e['msg']}" for e in exc.errors()[:5]
        ]
        raise CommandError("invalid", "; ".join(parts)) from None


def store_label(db: sqlite_utils.Database, cmd: LabelCommand, now: float | None = None) -> dict:
    """Record the verdict on an alert of this gateway (the latest verdict wins). CommandError
    'unknown_alert' when the alert is not in the database."""
    row = db.execute(
        "SELECT device, opened_ts, resolved_ts, payload_json FROM alerts WHERE alert_id = ?", [cmd.alert_id]
    ).fetchone()
    if row is None:
        raise CommandError("unknown_alert", f"no alert {cmd.alert_id} on this gateway")
    device, opened_ts, resolved_ts, payload_json = row
    try:
        model_id = json.loads(payload_json).get("model_id")
    except ValueError:
        model_id = None
    record = {
        "alert_id": cmd.alert_id,
        "device": device,
        "label": cmd.label,
        "note": cmd.note,
        "author": cmd.author,
        "opened_ts": opened_ts,
        "resolved_ts": resolved_ts,
        "model_id": model_id,
        "labelled": time.time() if now is None else now,
    }
    with db.conn:
        db["labels"].upsert(record, pk="alert_id")
    return record


def labels(db: sqlite_utils.Database, device: str | None = None) -> list[dict]:
    """Every stored label (of one device), oldest alert first."""
    where, args = ("WHERE device = ?", [device]) if device is not None else ("", [])
    return list(db.query(f"SELECT * FROM labels {where} ORDER BY opened_ts", args))
