"""Upstream payloads against agent/schemas/*.json: real payloads off a real broker, plus hand-built ones."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from conftest import Broker
from test_uplink import Subscriber, uplink_config, wait_for

from agent.health import HealthConfig, HealthMonitor
from agent.types import Event, Reject
from agent.uplink import Outbox, Uplink, encode_payload


def schema(name: str) -> jsonschema.Draft202012Validator:
    text = resources.files("agent").joinpath("schemas", f"{name}.json").read_text()
    doc = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(doc)
    return jsonschema.Draft202012Validator(doc)


def errors(name: str, payload: dict) -> list[str]:
    return [e.message for e in schema(name).iter_errors(payload)]


def hand_alert(state: str = "open", n: int = 0) -> dict:
    """An alert exactly as docs/mqtt.md describes it, built without agent/alert.py."""
    device, opened_ts, model_id = "pump-01", 1_767_225_600.125, "default-0123abcd4567"
    alert_id = hashlib.sha256(f"{device}|{opened_ts:.3f}|{model_id}".encode()).hexdigest()[:16]
    return {
        "v": 1,
        "type": "alert",
        "msg_id": f"{alert_id}:{n}",
        "alert_id": alert_id,
        "state": state,
        "gateway": "gw-01",
        "device": device,
        "model_id": model_id,
        "ts": opened_ts + 30.0 * n,
        "opened_ts": opened_ts,
        "resolved_ts": opened_ts + 30.0 * n if state == "resolve" else None,
        "score": 0.91,
        "threshold": 0.42,
        "peak": 1.3,
        "severity": "critical",
        "top_sensors": [{"channel": "vibration", "share": 0.71}, {"channel": "pressure", "share": 0.2}],
        "windows": 3 + n,
    }


@pytest.mark.parametrize("name", ["alert", "health", "status"])
def test_schemas_are_valid_draft_2020_12(name: str) -> None:
    assert schema(name).schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema(name).schema["additionalProperties"] is False


@pytest.mark.parametrize(("state", "n"), [("open", 0), ("update", 1), ("resolve", 2)])
def test_hand_built_alert_validates_after_encoding(state: str, n: int) -> None:
    payload = json.loads(encode_payload(hand_alert(state, n)))
    assert errors("alert", payload) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p.update(extra=1), "Additional properties"),
        (lambda p: p.pop("windows"), "'windows' is a required property"),
        (lambda p: p.update(state="opened"), "is not one of"),
        (lambda p: p.update(score=None), "is not of type 'number'"),  # a NaN score arrives as null
        (lambda p: p.update(msg_id="xyz"), "does not match"),
        (lambda p: p.update(resolved_ts=1.0), "is not of type 'null'"),  # open with a resolve time
        (lambda p: p["top_sensors"].append({"channel": "t", "share": 1.5}), "greater than the maximum"),
    ],
)
def test_alert_schema_rejects_what_the_contract_forbids(mutate, expected: str) -> None:
    payload = copy.deepcopy(hand_alert())
    mutate(payload)
    errs = errors("alert", payload)
    assert any(expected in e for e in errs), errs


@pytest.mark.timeout(60)
def test_real_health_and_status_payloads_off_the_broker_validate(broker: Broker, db_path: Path) -> None:
    monitor = HealthMonitor(HealthConfig(), "gw-01")
    t0 = 1_767_225_600.0
    raised: list[Event] = []
    for i in range(10):
        raised += monitor.observe_reject(Reject("checksum", "CRC mismatch"), "/dev/ttyUSB0", t0 + i)
    cleared = monitor.tick(t0 + 3600.0)
    assert [e.payload["state"] for e in raised + cleared] == ["raised", "cleared"]

    sub = Subscriber(broker, "edgewatch/gw-01/#")
    cfg = uplink_config(broker)
    up = Uplink(cfg, Outbox(db_path, cfg), "gw-01", lambda: {"model_id": None, "devices": ["pump-01"]})
    try:
        for e in raised + cleared:
            assert up.enqueue(e)
        up.start()
        assert up.flush(10)
        up.publish_status()
        assert wait_for(lambda: len(sub.payloads("/health")) == 2 and len(sub.payloads("/status")) >= 2)
        up.stop(timeout=2.0)
        assert wait_for(lambda: any(p["state"] == "offline" for p in sub.payloads("/status")))
        # The last will is built by the same code at each connect; check its shape too.
        will = up.status_payload("offline", now=time.time())
    finally:
        up.stop(timeout=0.5)
        up.outbox.close()
        sub.close()

    topics = {t for t, _, _ in sub.messages}
    assert "edgewatch/gw-01/_dev_ttyUSB0/health" in topics
    for p in sub.payloads("/health"):
        assert errors("health", p) == [], p
        assert p["device"] == "/dev/ttyUSB0"
    statuses = sub.payloads("/status")
    assert {p["state"] for p in statuses} == {"online", "offline"}
    for p in statuses:
        assert errors("status", p) == [], p
    assert errors("status", json.loads(encode_payload(will))) == []


def test_status_schema_rejects_a_wrong_outbox_block() -> None:
    good = {
        "v": 1,
        "type": "status",
        "msg_id": "status:gw-01:1767225600000",
        "gateway": "gw-01",
        "state": "online",
        "ts": 1_767_225_600.0,
        "version": "0.1.0",
        "model_id": None,
        "uptime_s": 1.0,
        "outbox": {"depth": 0, "dropped": 0},
        "devices": [],
    }
    assert errors("status", good) == []
    bad = copy.deepcopy(good)
    bad["outbox"] = {"depth": -1, "dropped": 0, "bytes": 3}
    errs = errors("status", bad)
    assert any("Additional properties" in e for e in errs) and any("minimum" in e for e in errs), errs
