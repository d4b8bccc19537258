"""The command topic: only documented, schema-valid, size-limited commands act; labels, reload and drift
reset through a real mosquitto; commands sent while the gateway is offline arrive when it is back."""

from __future__ import annotations

import json
import shutil
import threading
import time
from importlib import resources
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from conftest import Broker, write_agent_config
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bundle import Manifest, finalize_bundle, load_bundle
from agent.command import (
    COMMAND_ADAPTER,
    CommandError,
    DriftResetCommand,
    LabelCommand,
    ReloadCommand,
    labels,
    parse_command,
    store_label,
)
from agent.config import load_config
from agent.db import open_db
from agent.service import Agent

ROOT = Path(__file__).resolve().parents[1]
AID = "0123456789abcdef"


def _schema() -> dict:
    return json.loads(resources.files("agent").joinpath("schemas", "command.json").read_text())


def label(**kw: object) -> bytes:
    return json.dumps({"type": "label", "alert_id": AID, "label": "false_positive", **kw}).encode()


def test_valid_commands_parse() -> None:
    cmd = parse_command(label(note="pump was flushed\nby hand", author="ana", msg_id="ui-17"))
    assert isinstance(cmd, LabelCommand) and cmd.label == "false_positive" and cmd.author == "ana"
    assert isinstance(parse_command(b'{"type":"reload"}'), ReloadCommand)
    reset = parse_command(b'{"type":"drift_reset","device":"pump-01","v":1}')
    assert isinstance(reset, DriftResetCommand) and reset.device == "pump-01"
    assert parse_command(b'{"type":"drift_reset"}').device is None


@pytest.mark.parametrize(
    ("payload", "reason", "says"),
    [
        (b"x" * 5000, "too_large", "5000 bytes"),
        (b'{"type":"reload"}\xff', "not_utf8", ""),
        (b'{"type":"reload"', "not_json", ""),
        (b'["reload"]', "invalid", "JSON object"),
        (b'{"type":"shell","cmd":"rm -rf /"}', "unknown_type", "shell"),
        (b'{"label":"true_positive"}', "unknown_type", "None"),
        (json.dumps({"type": "label", "label": "true_positive"}).encode(), "invalid", "alert_id"),
        (label(extra=1), "invalid", "extra"),
        (label(label="probably"), "invalid", "label"),
        (
            json.dumps({"type": "label", "alert_id": "../../etc", "label": "maintenance"}).encode(),
            "invalid",
            "",
        ),
        (label(note="a\x00b"), "invalid", "note"),
        (label(note="n" * 1001), "invalid", "note"),
        (label(v=2), "invalid", "v"),
        (b'{"type":"reload","path":"/tmp/evil"}', "invalid", "path"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(payload: bytes, reason: str, says: str) -> None:
    with pytest.raises(CommandError) as err:
        parse_command(payload)
    assert err.value.reason == reason and says in err.value.detail


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_escape_the_parser(payload: bytes) -> None:
    try:
        parse_command(payload)
    except CommandError as exc:
        assert exc.reason in {"too_large", "not_utf8", "not_json", "invalid", "unknown_type"}


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["label", "reload", "drift_reset", "other"])},
        optional={"alert_id": JSONISH, "label": JSONISH, "note": JSONISH, "device": JSONISH, "x": JSONISH},
    )
)
def test_parser_and_published_schema_agree(doc: dict) -> None:
    """Whatever the parser accepts validates against schemas/command.json, and what it refuses does not."""
    validator = jsonschema.Draft202012Validator(_schema())
    try:
        parse_command(json.dumps(doc).encode())
        accepted = True
    except CommandError:
        accepted = False
    assert accepted == validator.is_valid(doc), doc


def test_published_schema_is_the_generated_one() -> None:
    """schemas/command.json is regenerated from agent/command.py, never edited apart from it."""
    doc = _schema()
    body = {k: v for k, v in doc.items() if k not in ("$schema", "$id", "title", "description")}
    assert body == COMMAND_ADAPTER.json_schema()


def _alert_row(db, alert_id: str = AID, device: str = "pump-01", opened: float = 1000.0) -> None:
    payload = {"v": 1, "type": "alert", "msg_id": f"{alert_id}:1", "alert_id": alert_id}
    payload |= {"model_id": "default-abc", "device": device, "state": "resolve"}
    with db.conn:
        db["alerts"].insert(
            {
                "alert_id": alert_id,
                "device": device,
                "kind": "anomaly",
                "state": "resolved",
                "opened_ts": opened,
                "updated_ts": opened + 60,
                "resolved_ts": opened + 60,
                "peak": 0.9,
                "payload_json": json.dumps(payload),
            }
        )


def test_a_label_keeps_the_alerts_span_and_the_latest_verdict_wins(fresh_db) -> None:
    with pytest.raises(CommandError, match="unknown_alert"):
        store_label(fresh_db, parse_command(label()))  # type: ignore[arg-type]
    assert labels(fresh_db) == []
    _alert_row(fresh_db)
    store_label(fresh_db, parse_command(label(note="first look")), now=5.0)  # type: ignore[arg-type]
    store_label(fresh_db, parse_command(label(label="true_positive")), now=6.0)  # type: ignore[arg-type]
    (row,) = labels(fresh_db)
    assert row["label"] == "true_positive" and row["note"] is None and row["labelled"] == 6.0
    assert (row["device"], row["opened_ts"], row["resolved_ts"], row["model_id"]) == (
        "pump-01",
        1000.0,
        1060.0,
        "default-abc",
    )
    # the label outlives the alert row (retention)
    with fresh_db.conn:
        fresh_db.execute("DELETE FROM alerts")
    assert labels(fresh_db, "pump-01")[0]["alert_id"] == AID


# -- through a real broker ----------------------------------------------------------------------


def _agent(tmp_path: Path, broker: Broker, model: Path) -> Agent:
    cfg = write_agent_config(
        tmp_path,
        "gw-cmd",
        model,
        "watch_interval_s = 3600",
        f'[uplink.mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n[metrics]\nenabled = false\n',
    )
    return Agent(load_config(cfg), sources=[])


class Running:
    """An agent's main loop in a thread (as `edgewatch run` runs it), stopped on exit."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.thread = threading.Thread(target=agent.run, daemon=True)

    def __enter__(self) -> Agent:
        self.thread.start()
        assert self.agent.commands is not None
        assert self.agent.commands.subscribed.wait(10), "command subscription not acknowledged"
        return self.agent

    def __exit__(self, *exc: object) -> None:
        self.agent.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


def _publish(broker: Broker, payloads: list[bytes], topic: str = "edgewatch/gw-cmd/cmd") -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="operator")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        for p in payloads:
            c.publish(topic, p, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _labels(db_file: Path) -> list[dict]:
    db = open_db(db_file)
    try:
        return labels(db)
    finally:
        db.conn.close()


@pytest.mark.timeout(60)
def test_commands_over_mqtt_label_reload_and_survive_an_offline_gateway(
    tmp_path: Path, broker: Broker
) -> None:
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "default", model)
    agent = _agent(tmp_path, broker, model)
    _alert_row(agent.db)
    refused_before = agent.pipeline.stats.accepted
    with Running(agent):
        # junk first: refused and counted, the agent keeps going and takes the valid label after it
        _publish(broker, [b"\xff\xfe", b'{"type":"format_disk"}', b"{" * 10000, label(author="ana")])
        assert _wait(lambda: len(_labels(agent.db_path)) == 1)
        assert _labels(agent.db_path)[0]["label"] == "false_positive"
        # reload: a new bundle is picked up at once although the watch interval is an hour, and
        # starts its rollout (scored in shadow beside the current model, docs/model.md)
        old = agent.bundle.model_id
        m = Manifest.model_validate(json.loads((model / "manifest.json").read_text()))
        finalize_bundle(model, m.model_copy(update={"created_at": "2031-01-01T00:00:00Z"}))
        new = load_bundle(model).model_id
        _publish(broker, [b'{"type":"reload"}'])
        assert _wait(lambda: agent.pipeline.shadow is not None and agent.pipeline.shadow.model_id == new)
        assert agent.bundle.model_id == old != new
    assert agent.pipeline.stats.accepted == refused_before  # commands are not readings

    # gateway offline: a verdict sent now is kept by the broker for the command session ...
    _publish(broker, [label(label="maintenance", note="bearing replaced")])
    again = _agent(tmp_path, broker, model)
    with Running(again):
        # ... and carried out when the gateway is back
        assert _wait(lambda: _labels(again.db_path)[0]["label"] == "maintenance")
    assert _labels(again.db_path)[0]["note"] == "bearing replaced"


def test_the_command_client_id_must_not_clash(tmp_path: Path) -> None:
    from agent.config import ConfigError

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        """
[gateway]
id = "gw"
[[sources]]
type = "serial"
name = "bus"
port = "/dev/ttyUSB0"
[model]
path = "models/default"
[uplink]
client_id = "same"
[commands]
client_id = "same"
"""
    )
    with pytest.raises(ConfigError, match="client id 'same' is used twice"):
        load_config(cfg)
