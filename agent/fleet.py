"""`edgewatch fleet`: a live view of many gateways from what they publish upstream (docs/fleet.md).

The library half is pure: `FleetState.ingest(topic, payload, now)` folds one MQTT message into
per-gateway / per-device state, and `render(state, now)` turns it into a plain-text table. Nothing here
trusts the wire: a message that is not one of the agent's payloads (docs/mqtt.md) is counted by reason
and ignored, duplicates (same `msg_id`, the agent delivers at least once) change nothing, and a late,
older message of an alert or health episode never overwrites a newer one. The CLI half connects with
the agent's own MQTT client factory (same TLS and credential options) and redraws every second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import tomllib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.uplink import topic_level

ALERT_STATES = ("open", "update", "resolve")
SEVERITIES = ("warning", "critical")
HEALTH_STATES = ("raised", "cleared")
HEALTH_KINDS = ("silent", "stuck", "out_of_range", "nan", "garbage")
STATUS_STATES = ("online", "offline")
DEFAULT_STALE_AFTER_S = 180.0  # 3 x the agent's default heartbeat (scheduler.status_interval_s = 60)
SEEN_IDS = 100_000  # msg_ids remembered for de-duplication (a few days of alerts of a large fleet)


class Invalid(ValueError):
    """A message that is not a valid agent payload; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# -- field checks: each raises Invalid("invalid", ...) naming the key ----------------------------------


def _str(p: Mapping[str, Any], key: str, *, empty: bool = False) -> str:
    v = p.get(key)
    if not isinstance(v, str) or (not v and not empty):
        raise Invalid("invalid", f"{key} must be a non-empty string, got {v!r}")
    return v


def _num(p: Mapping[str, Any], key: str, *, minimum: float | None = None) -> float:
    v = p.get(key)
    # bool is an int in Python but not a number in JSON Schema; null here means a NaN left a stage
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise Invalid("invalid", f"{key} must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise Invalid("invalid", f"{key} must be >= {minimum:g}, got {v!r}")
    return float(v)


def _int(p: Mapping[str, Any], key: str, *, minimum: int = 0) -> int:
    v = p.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise Invalid("invalid", f"{key} must be an integer >= {minimum}, got {v!r}")
    return v


def _choice(p: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    v = p.get(key)
    if v not in choices:
        raise Invalid("invalid", f"{key} must be one of {', '.join(choices)}, got {v!r}")
    return str(v)


def _seq(msg_id: str, base: str, allowed: Iterable[int] | None = None) -> int:
    """n of a msg_id '<base>:<n>' (alert and health ids), checked against the id it claims to belong to."""
    head, sep, tail = msg_id.rpartition(":")
    if not sep or head != base or not tail.isdigit() or (len(tail) > 1 and tail[0] == "0"):
        raise Invalid("invalid", f"msg_id {msg_id!r} is not '{base}:<n>'")
    n = int(tail)
    if allowed is not None and n not in allowed:
        raise Invalid("invalid", f"msg_id {msg_id!r}: n must be one of {sorted(allowed)}")
    return n


# -- state -----------------------------------------------------------------------------------------


@dataclass
class AlertView:
    """A device's open alert as of its newest message (open or update)."""

    alert_id: str
    n: int  # the n of the newest message applied (msg_id '<alert_id>:<n>')
    state: str  # open | update
    severity: str
    opened_ts: float  # device time
    ts: float  # device time of the newest message
    score: float
    threshold: float
    peak: float
    windows: int
    model_id: str
    top_sensors: list[dict[str, Any]]
    received: float  # fleet clock


@dataclass
class HealthView:
    """A raised, not yet cleared sensor-health episode."""

    event_id: str
    kind: str
    channel: str | None
    ts: float
    count: int
    detail: str


@dataclass
class DeviceView:
    name: str
    alert: AlertView | None = None
    health: dict[str, HealthView] = field(default_factory=dict)
    last_event: float | None = None  # fleet clock of the newest alert/health message about it
    alerts_opened: int = 0  # alerts first seen while this view ran
    alerts_resolved: int = 0
    last_resolved: dict[str, Any] | None = None  # {"alert_id", "resolved_ts", "peak", "severity"}
    in_status: bool = False  # listed in the gateway's latest status


@dataclass
class GatewayView:
    name: str
    reported_state: str | None = None  # online | offline, from the newest status (None: none seen yet)
    status_ts: float | None = None  # gateway clock of the newest status figures
    state_changed: float | None = None  # fleet clock when reported_state last changed
    last_seen: float | None = None  # fleet clock of the newest message from it (retained: its own ts)
    outbox_depth: int | None = None
    outbox_dropped: int | None = None
    model_id: str | None = None
    version: str | None = None
    uptime_s: float | None = None
    devices: dict[str, DeviceView] = field(default_factory=dict)

    def device(self, name: str) -> DeviceView:
        dev = self.devices.get(name)
        if dev is None:
            dev = self.devices[name] = DeviceView(name)
        return dev


class _Seen:
    """A bounded set of recently seen keys (oldest forgotten first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._keys: OrderedDict[Any, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: Any) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.size:
            self._keys.popitem(last=False)


class FleetState:
    """Everything the fleet view knows, folded from the messages of `<prefix>/+/status`,
    `<prefix>/+/+/alert` and `<prefix>/+/+/health`. Not thread-safe: the caller serialises `ingest`.

    `counts` holds one counter per outcome: `status`, `alert`, `health` (applied), `duplicate` (msg_id
    already applied), `stale` (an older message of an alert/episode/status that a newer one already
    superseded), and the reasons a message was ignored: `not_json`, `invalid`, `unsupported` (another
    payload version `v`), `unknown_topic`.
    """

    IGNORED = ("not_json", "invalid", "unsupported", "unknown_topic")

    def __init__(
        self,
        prefix: str = "edgewatch",
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        seen_ids: int = SEEN_IDS,
    ) -> None:
        if not prefix.strip("/") or any(c in prefix for c in "#+\x00"):
            raise ValueError(f"prefix {prefix!r} must be non-empty and contain no MQTT wildcard")
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s!r}")
        self.prefix = prefix.rstrip("/")
        self.stale_after_s = float(stale_after_s)
        self.gateways: dict[str, GatewayView] = {}
        self.counts: Counter[str] = Counter()
        self.last_ignored: list[dict[str, str]] = []  # the newest few, for `render` and --json
        self._seen = _Seen(seen_ids)  # msg_ids applied (status: (msg_id, state), see _status)
        self._closed = _Seen(seen_ids)  # alert / health episode ids resolved or cleared

    @property
    def topics(self) -> list[str]:
        """What to subscribe to."""
        p = self.prefix
        return [f"{p}/+/status", f"{p}/+/+/alert", f"{p}/+/+/health"]

    def gateway(self, name: str) -> GatewayView:
        gw = self.gateways.get(name)
        if gw is None:
            gw = self.gateways[name] = GatewayView(name)
        return gw

    # -- ingest ------------------------------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes, now: float, retained: bool = False) -> str:
        """Fold one message in; returns its outcome (a key of `counts`). Never raises on bad input."""
        try:
            outcome = self._ingest(topic, payload, now, retained)
        except Invalid as exc:
            outcome = exc.reason
            self.last_ignored = [*self.last_ignored[-4:], {"topic": topic[:200], "reason": f"{exc}"[:200]}]
        self.counts[outcome] += 1
        return outcome

    def _ingest(self, topic: str, payload: bytes, now: float, retained: bool) -> str:
        if not topic.startswith(self.prefix + "/"):
            raise Invalid("unknown_topic", "outside the prefix")
        levels = topic[len(self.prefix) + 1 :].split("/")
        if len(levels) == 2 and levels[1] == "status":
            kind, gw_level, dev_level = "status", levels[0], None
        elif len(levels) == 3 and levels[2] in ("alert", "health"):
            kind, gw_level, dev_level = levels[2], levels[0], levels[1]
        else:
            raise Invalid(
                "unknown_topic", "not <prefix>/<gateway>/status or <prefix>/<gateway>/<device>/alert|health"
            )
        try:
            p = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise Invalid("not_json", f"not JSON: {exc}") from None
        if not isinstance(p, dict):
            raise Invalid("not_json", f"a JSON {type(p).__name__}, not an object")
        if p.get("v") != 1:
            raise Invalid("unsupported", f"payload version v={p.get('v')!r} (this view reads v=1)")
        if p.get("type") != kind:
            raise Invalid("invalid", f"type {p.get('type')!r} on a {kind} topic")
        gateway = _str(p, "gateway")
        if topic_level(gateway) != gw_level:
            raise Invalid("invalid", f"gateway {gateway!r} does not match the topic")
        msg_id = _str(p, "msg_id")
        if dev_level is not None:
            device = _str(p, "device")
            if topic_level(device) != dev_level:
                raise Invalid("invalid", f"device {device!r} does not match the topic")
        if kind == "status":
            return self._status(p, msg_id, gateway, now, retained)
        if kind == "alert":
            return self._alert(p, msg_id, gateway, device, now)
        return self._health(p, msg_id, gateway, device, now)

    @staticmethod
    def _saw(gw: GatewayView, at: float) -> None:
        gw.last_seen = at if gw.last_seen is None else max(gw.last_seen, at)

    def _status(self, p: dict, msg_id: str, gateway: str, now: float, retained: bool) -> str:
        state = _choice(p, "state", STATUS_STATES)
        ts = _num(p, "ts")
        outbox = p.get("outbox")
        if not isinstance(outbox, dict):
            raise Invalid("invalid", f"outbox must be an object, got {outbox!r}")
        depth, dropped = _int(outbox, "depth"), _int(outbox, "dropped")
        devices = p.get("devices")
        if not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices):
            raise Invalid("invalid", f"devices must be a list of names, got {devices!r}")
        model_id = p.get("model_id")
        if model_id is not None and not isinstance(model_id, str):
            raise Invalid("invalid", f"model_id must be a string or null, got {model_id!r}")
        version = _str(p, "version")
        uptime = _num(p, "uptime_s", minimum=0)
        # The last will is built at connect, so an online status of that connect may share its
        # millisecond msg_id: de-duplicate on (msg_id, state).
        key = (msg_id, state)
        gw = self.gateway(gateway)
        # A retained status may be old: it counts as "seen" at its own time (capped at ours).
        self._saw(gw, min(now, ts) if retained else now)
        if key in self._seen:
            return "duplicate"
        self._seen.add(key)
        if gw.status_ts is not None and ts < gw.status_ts:
            if state != "offline":
                return "stale"
            # The last will carries the figures as at its connect: the gateway is gone, but the
            # newer figures of its last heartbeat stay the best known ones.
            if gw.reported_state != "offline":
                gw.reported_state, gw.state_changed = "offline", now
            return "status"
        if gw.reported_state != state:
            gw.state_changed = now
        gw.reported_state, gw.status_ts = state, ts
        gw.outbox_depth, gw.outbox_dropped = depth, dropped
        gw.model_id, gw.version, gw.uptime_s = model_id, version, uptime
        listed = set(devices)
        for name in listed:
            gw.device(name)
        for name, dev in gw.devices.items():
            dev.in_status = name in listed
        return "status"

    def _alert(self, p: dict, msg_id: str, gateway: str, device: str, now: float) -> str:
        alert_id = _str(p, "alert_id")
        if len(alert_id) != 16 or any(c not in "0123456789abcdef" for c in alert_id):
            raise Invalid("invalid", f"alert_id {alert_id!r} is not 16 hex digits")
        n = _seq(msg_id, alert_id)
        state = _choice(p, "state", ALERT_STATES)
        if (state == "open") != (n == 0):
            raise Invalid("invalid", f"state {state!r} with msg_id {msg_id!r} (open is n = 0, and only it)")
        top = p.get("top_sensors")
        if not isinstance(top, list) or len(top) > 3:
            raise Invalid("invalid", f"top_sensors must be a list of at most 3, got {top!r}")
        sensors = [{"channel": _str(t, "channel"), "share": _num(t, "share", minimum=0)} for t in top
                   if isinstance(t, dict)]  # fmt: skip
        if len(sensors) != len(top):
            raise Invalid("invalid", f"top_sensors entries must be objects, got {top!r}")
        resolved_ts = p.get("resolved_ts")
        if state == "resolve":
            resolved_ts = _num(p, "resolved_ts")
        elif resolved_ts is not None:
            raise Invalid("invalid", f"resolved_ts must be null until resolve, got {resolved_ts!r}")
        view = AlertView(
            alert_id=alert_id,
            n=n,
            state=state,
            severity=_choice(p, "severity", SEVERITIES),
            opened_ts=_num(p, "opened_ts"),
            ts=_num(p, "ts"),
            score=_num(p, "score", minimum=0),
            threshold=_num(p, "threshold", minimum=0),
            peak=_num(p, "peak", minimum=0),
            windows=_int(p, "windows", minimum=1),
            model_id=_str(p, "model_id"),
            top_sensors=sensors,
            received=now,
        )
        gw = self.gateway(gateway)
        self._saw(gw, now)
        if msg_id in self._seen:
            return "duplicate"
        self._seen.add(msg_id)
        dev = gw.device(device)
        dev.last_event = now
        current = dev.alert
        if alert_id in self._closed:
            return "stale"  # a late message of an alert already resolved must not reopen it
        if current is not None and current.alert_id == alert_id:
            if n <= current.n:
                return "stale"  # an older message of this alert arriving after a newer one
        elif current is not None and view.opened_ts < current.opened_ts:
            return "stale"  # an older alert's late message; the device's newer alert stays
        else:
            # first sight of this alert (its open, or a later message when the view started late);
            # an older alert of the device whose resolve never reached us is replaced by it
            dev.alerts_opened += 1
        if state == "resolve":
            self._closed.add(alert_id)
            dev.alert = None
            dev.alerts_resolved += 1
            dev.last_resolved = {
                "alert_id": alert_id,
                "resolved_ts": resolved_ts,
                "peak": view.peak,
                "severity": view.severity,
            }
        else:
            dev.alert = view
        return "alert"

    def _health(self, p: dict, msg_id: str, gateway: str, device: str, now: float) -> str:
        event_id = _str(p, "event_id")
        state = _choice(p, "state", HEALTH_STATES)
        _seq(msg_id, event_id, allowed=(HEALTH_STATES.index(state),))
        channel = p.get("channel")
        if channel is not None and not (isinstance(channel, str) and channel):
            raise Invalid("invalid", f"channel must be a name or null, got {channel!r}")
        detail = p.get("detail")
        if not isinstance(detail, str):
            raise Invalid("invalid", f"detail must be a string, got {detail!r}")
        view = HealthView(
            event_id=event_id,
            kind=_choice(p, "kind", HEALTH_KINDS),
            channel=channel,
            ts=_num(p, "ts"),
            count=_int(p, "count"),
            detail=detail,
        )
        gw = self.gateway(gateway)
        self._saw(gw, now)
        if msg_id in self._seen:
            return "duplicate"
        self._seen.add(msg_id)
        dev = gw.device(device)
        dev.last_event = now
        if event_id in self._closed:
            return "stale"
        if state == "cleared":
            self._closed.add(event_id)
            dev.health.pop(event_id, None)
        else:
            dev.health[event_id] = view
        return "health"

    # -- views -------------------------------------------------------------------------------------
    def effective_state(self, gw: GatewayView, now: float) -> str:
        """online / offline as reported, `stale` when online but silent for stale_after_s (a heartbeat
        is overdue and the broker has not published the will yet), `unknown` before any status."""
        if gw.reported_state is None:
            return "unknown"
        if gw.reported_state == "online" and (
            gw.last_seen is None or now - gw.last_seen > self.stale_after_s
        ):
            return "stale"
        return gw.reported_state

    def snapshot(self, now: float) -> dict[str, Any]:
        """The whole state as plain JSON data (what `--json` prints)."""
        gateways = []
        for name in sorted(self.gateways):
            gw = self.gateways[name]
            devices = []
            for dname in sorted(gw.devices):
                dev = gw.devices[dname]
                devices.append(
                    {
                        "device": dev.name,
                        "in_status": dev.in_status,
                        "open_alert": asdict(dev.alert) if dev.alert else None,
                        "health": [asdict(h) for h in dev.health.values()],
                        "last_event": dev.last_event,
                        "alerts_opened": dev.alerts_opened,
                        "alerts_resolved": dev.alerts_resolved,
                        "last_resolved": dev.last_resolved,
                    }
                )
            gateways.append(
                {
                    "gateway": gw.name,
                    "state": self.effective_state(gw, now),
                    "reported_state": gw.reported_state,
                    "status_ts": gw.status_ts,
                    "state_changed": gw.state_changed,
                    "last_seen": gw.last_seen,
                    "outbox": {"depth": gw.outbox_depth, "dropped": gw.outbox_dropped},
                    "model_id": gw.model_id,
                    "version": gw.version,
                    "uptime_s": gw.uptime_s,
                    "open_alerts": sum(d.alert is not None for d in gw.devices.values()),
                    "devices": devices,
                }
            )
        return {
            "ts": now,
            "prefix": self.prefix,
            "stale_after_s": self.stale_after_s,
            "gateways": gateways,
            "counts": dict(sorted(self.counts.items())),
            "last_ignored": list(self.last_ignored),
        }


# -- rendering -------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """'12s', '5m', '3h', '2d': the largest whole unit, enough for a glance."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(max(seconds, 0.0))}s"


def _age(now: float, then: float | None) -> str:
    """How long ago `then` was; its UTC time when it is more than a minute ahead of `now` (device time
    on a gateway whose clock runs ahead, rather than a negative age)."""
    if then is None:
        return "-"
    if then - now > 60:
        return datetime.fromtimestamp(then, UTC).strftime("%m-%d %H:%MZ")
    return _duration(now - then)


def _num_text(v: float | int | None) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def render(state: FleetState, now: float, title: str | None = None) -> str:
    """The fleet as plain text: a summary line, one row per gateway, one row per device. Pure: the same
    state and `now` give the same text (no terminal size, no colour, no clock)."""
    snap = state.snapshot(now)
    gws = snap["gateways"]
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    lines = [f"{title or 'edgewatch fleet'}  prefix {state.prefix}  {stamp}"]
    by_state = Counter(g["state"] for g in gws)
    alerts = [d["open_alert"] for g in gws for d in g["devices"] if d["open_alert"]]
    n_dev = sum(len(g["devices"]) for g in gws)
    waiting = sum(g["outbox"]["depth"] or 0 for g in gws)
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
    crit = sum(a["severity"] == "critical" for a in alerts)
    lines.append(
        f"{len(gws)} gateway{'s' * (len(gws) != 1)}" + (f" ({states})" if states else "")
        + f", {n_dev} device{'s' * (n_dev != 1)}, {len(alerts)} open alert{'s' * (len(alerts) != 1)}"
        + f" ({crit} critical), {waiting} message{'s' * (waiting != 1)} waiting in outboxes"
    )  # fmt: skip
    if not gws:
        lines += ["", "no gateway has reported yet (waiting for status, alert or health messages)"]
    else:
        rows = [
            [
                g["gateway"],
                g["state"],
                _age(now, g["last_seen"]),
                _num_text(g["outbox"]["depth"]),
                _num_text(g["outbox"]["dropped"]),
                str(len(g["devices"])),
                str(g["open_alerts"]),
                "-" if g["uptime_s"] is None else _duration(g["uptime_s"]),
                g["model_id"] or "-",
            ]
            for g in gws
        ]
        header = ["GATEWAY", "STATE", "SEEN", "OUTBOX", "DROPPED", "DEVICES", "ALERTS", "UPTIME", "MODEL"]
        lines += ["", *_table(header, rows)]
        rows = []
        for g in gws:
            for d in g["devices"]:
                a = d["open_alert"]
                health = ",".join(sorted({f"{h['kind']}" + (f"({h['channel']})" if h["channel"] else "")
                                          for h in d["health"]})) or "-"  # fmt: skip
                if a:
                    top = ", ".join(f"{t['channel']} {round(t['share'] * 100)}%" for t in a["top_sensors"])
                    alert = [a["severity"], _age(now, a["opened_ts"]), f"{a['peak']:.3g}",
                             f"{a['score']:.3g}/{a['threshold']:.3g}", top or "-"]  # fmt: skip
                else:
                    alert = ["-", "-", "-", "-", "-"]
                rows.append([g["gateway"], d["device"], *alert, health, _age(now, d["last_event"])])
        if rows:
            header = ["GATEWAY", "DEVICE", "ALERT", "OPENED", "PEAK", "SCORE/THR", "TOP SENSORS", "HEALTH",
                      "LAST EVENT"]  # fmt: skip
            lines += ["", *_table(header, rows)]
    ignored = {k: v for k, v in snap["counts"].items() if k in FleetState.IGNORED}
    if ignored:
        what = ", ".join(f"{v} {k}" for k, v in ignored.items())
        last = snap["last_ignored"][-1]
        lines += ["", f"ignored: {what} (last: {last['topic']}: {last['reason']})"]
    return "\n".join(lines) + "\n"


# -- command line ----------------------------------------------------------------------------------


class FleetError(Exception):
    """A problem with the command line or the config file; the message is for the user."""


def connection_from_args(args: argparse.Namespace) -> tuple[Any, str]:
    """(MqttConnectionConfig, topic prefix) from `--config FILE`'s [uplink] section and the flags, the
    flags winning. The fleet never takes the gateway's uplink.client_id (it would knock the gateway off)."""
    from pydantic import ValidationError

    from agent.mqtt_client import MqttConnectionConfig, parse_broker

    data: dict[str, Any] = {}
    prefix = "edgewatch"
    if args.config:
        from agent.config import format_errors
        from agent.uplink import UplinkConfig

        try:
            with Path(args.config).open("rb") as f:
                uplink = tomllib.load(f).get("uplink", {})
        except OSError as e:
            raise FleetError(f"{args.config}: cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise FleetError(f"{args.config}: invalid TOML: {e}") from None
        try:
            cfg = UplinkConfig.model_validate(uplink)
        except ValidationError as e:
            raise FleetError(
                "\n".join(f"{args.config}: uplink.{line}" for line in format_errors(e))
            ) from None
        data = cfg.mqtt.model_dump(exclude_unset=True)
        prefix = cfg.topic_prefix
    elif not args.broker:
        raise FleetError("give --broker HOST:PORT or --config FILE (an agent config's [uplink] section)")
    flags = {
        "username": args.username,
        "password_env": args.password_env,
        "tls_ca_file": args.ca_file,
        "tls_cert_file": args.cert_file,
        "tls_key_file": args.key_file,
    }
    if args.tls:
        data["tls"] = True
    if args.password_env:
        data.pop("password", None)
        data.pop("password_credential", None)
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.broker:
        try:
            data["host"], data["port"] = parse_broker(args.broker, 8883 if data.get("tls") else 1883)
        except ValueError as e:
            raise FleetError(f"--broker: {e}") from None
    try:
        conn = MqttConnectionConfig.model_validate(data)
    except ValidationError as e:
        raise FleetError("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())) from None
    prefix = args.prefix if args.prefix is not None else prefix
    return conn, prefix


class FleetClient:
    """An MQTT subscription feeding a FleetState (paho's network thread calls `ingest` under a lock)."""

    def __init__(self, conn: Any, state: FleetState, client_id: str, persistent: bool) -> None:
        from agent.mqtt_client import make_client

        self.conn, self.state = conn, state
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.ever_connected = False
        self.error: str | None = None
        self.client = make_client(conn, client_id, clean_start=not persistent)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_connect_fail = self._on_connect_fail

    def start(self) -> None:
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        if reason_code.is_failure:
            self.error = f"broker refused the connection: {reason_code}"
            return
        self.error = None
        client.subscribe([(t, 1) for t in self.state.topics])
        self.ever_connected = True
        self.connected.set()

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self.error = f"cannot connect to {self.conn.host}:{self.conn.effective_port}"

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        self.connected.clear()
        if getattr(reason_code, "is_failure", False):
            self.error = f"disconnected: {reason_code}"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.state.ingest(msg.topic, msg.payload, time.time(), retained=bool(msg.retain))

    def link(self) -> str:
        where = f"{self.conn.host}:{self.conn.effective_port}"
        if self.connected.is_set():
            return f"broker {where}"
        return f"broker {where} NOT CONNECTED" + (f" ({self.error})" if self.error else "")

    def output(self, as_json: bool) -> str:
        now = time.time()
        with self.lock:
            if as_json:
                snap = self.state.snapshot(now)
                snap["connected"] = self.connected.is_set()
                return json.dumps(snap, separators=(",", ":"), allow_nan=False) + "\n"
            return render(self.state, now, title=f"edgewatch fleet  {self.link()}")


def run_fleet_cli(args: argparse.Namespace, out: Callable[[str], None] | None = None) -> int:
    """`edgewatch fleet`: 0 after --once or Ctrl-C/SIGTERM; 1 if it never reached the broker; 2 for
    bad arguments."""
    write = out or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    if args.once is not None and not args.once >= 0:
        print("edgewatch fleet: --once must be >= 0 seconds", file=sys.stderr)
        return 2
    try:
        conn, prefix = connection_from_args(args)
        state = FleetState(prefix, stale_after_s=args.stale_after)
        client_id = args.client_id or f"edgewatch-fleet-{socket.gethostname()}-{os.getpid()}"
        fleet = FleetClient(conn, state, client_id, persistent=args.client_id is not None)
    except (FleetError, ValueError) as e:  # SecretError is a ValueError
        print(f"edgewatch fleet: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable TLS file
        print(f"edgewatch fleet: {e}", file=sys.stderr)
        return 2

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fleet.start()
    try:
        if args.once is not None:
            stop.wait(args.once)
            if not fleet.ever_connected:
                print(
                    f"edgewatch fleet: no connection within {args.once:g} s: {fleet.link()}", file=sys.stderr
                )
                return 1
            write(fleet.output(args.json))
            return 0
        tty = sys.stdout.isatty() and not args.json
        while not stop.is_set():
            text = fleet.output(args.json)
            write("\x1b[H\x1b[2J" + text if tty else text if args.json else text + "\n")
            stop.wait(1.0)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        fleet.stop()
        signal.signal(signal.SIGTERM, previous)
