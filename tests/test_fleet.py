"""Fleet view: FleetState folds the agent's own messages (built by the agent's alert manager, health
monitor and uplink, not by hand) into gateways / devices / open alerts; bad input is counted, never fatal;
end to end, two real gateways publish to one mosquitto and `edgewatch fleet` shows both."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from agent_proc import EDGEWATCH, Subscriber, serial_source, start_agent, start_sim_pty, stop, write_config
from conftest import Broker
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.alert import AlertConfig, AlertManager
from agent.cli import build_parser, main
from agent.fleet import FleetState, connection_from_args, render
from agent.health import HealthConfig, HealthMonitor
from agent.types import Event, Judgement, Reject, Score
from agent.uplink import Outbox, Uplink, UplinkConfig, encode_payload

T0 = 1_764_806_400.0
CH = {"temperature": 1.0, "vibration": 3.0, "pressure": 1.0}


class Gateway:
    """One gateway's real message builders: alert manager, health monitor and uplink (not started), so
    the topics and bytes are exactly what the agent would publish."""

    def __init__(self, tmp_path: Path, name: str = "gw-a", prefix: str = "edgewatch", **alert: float) -> None:
        self.name = name
        self.alerts = AlertManager(AlertConfig(open_k=3, open_n=5, **alert), name)  # type: ignore[arg-type]
        self.health = HealthMonitor(HealthConfig(), name)
        self.outbox = Outbox(tmp_path / f"{name}.db")
        devices = ["pump-01", "pump-02"]
        body = {"version": "0.1.0", "model_id": "model-a", "uptime_s": 12.0, "devices": devices}
        self.uplink = Uplink(UplinkConfig(topic_prefix=prefix), self.outbox, name, lambda: body)
        self.uplink._refresh_status_body()  # what start() does before the first status
        self.ts: dict[str, float] = {}

    def judge(self, device: str, *errors: float, thr: float = 1.0) -> list[Event]:
        """One window per error (1 s of device time apart) through the alert manager."""
        out = []
        for e in errors:
            ts = self.ts[device] = self.ts.get(device, T0) + 1.0
            score = Score(device, ts - 10, ts, e, dict(CH), "model-a")
            out.extend(self.alerts.update(Judgement(score, thr, e > thr)))
        return out

    def wire(self, event: Event) -> tuple[str, bytes]:
        return self.uplink.topic_for(event), encode_payload(event.payload)

    def status(self, state: str, now: float) -> tuple[str, bytes]:
        return self.uplink.status_topic, encode_payload(self.uplink.status_payload(state, now=now))


def feed(state: FleetState, gw: Gateway, events: list[Event], now: float = T0) -> list[str]:
    return [state.ingest(*gw.wire(e), now) for e in events]


def lifecycle(gw: Gateway) -> list[Event]:
    """open (warning), update (escalates to critical), update (peak grew), resolve."""
    events = gw.judge("pump-01", 2.0, 2.0, 2.0) + gw.judge("pump-01", 4.0) + gw.judge("pump-01", 5.0)
    events += gw.judge("pump-01", *[0.5] * 5)
    assert [e.payload["state"] for e in events] == ["open", "update", "update", "resolve"]
    return events


def device(snap: dict, gateway: str, name: str) -> dict:
    (gw,) = [g for g in snap["gateways"] if g["gateway"] == gateway]
    (dev,) = [d for d in gw["devices"] if d["device"] == name]
    return dev


def test_an_alert_opens_updates_and_resolves(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    state = FleetState()
    events = lifecycle(gw)
    assert feed(state, gw, events[:1]) == ["alert"]
    a = device(state.snapshot(T0), "gw-a", "pump-01")["open_alert"]
    assert a["alert_id"] == events[0].payload["alert_id"] and a["state"] == "open"
    assert a["severity"] == "warning" and a["peak"] == 2.0 and a["n"] == 0
    assert a["top_sensors"][0]["channel"] == "vibration"
    feed(state, gw, events[1:3])
    a = device(state.snapshot(T0), "gw-a", "pump-01")["open_alert"]
    assert a["severity"] == "critical" and a["peak"] == 5.0 and a["n"] == 2 and a["state"] == "update"
    assert state.snapshot(T0)["gateways"][0]["open_alerts"] == 1
    feed(state, gw, events[3:])
    dev = device(state.snapshot(T0), "gw-a", "pump-01")
    assert dev["open_alert"] is None and dev["alerts_opened"] == 1 and dev["alerts_resolved"] == 1
    assert dev["last_resolved"]["alert_id"] == a["alert_id"] and dev["last_resolved"]["peak"] == 5.0
    assert state.counts["alert"] == 4 and sum(state.counts.values()) == 4


def test_duplicates_change_nothing(tmp_path: Path) -> None:
    """At-least-once delivery: every message twice (and a resend of the whole stream) = once."""
    gw = Gateway(tmp_path)
    events = lifecycle(gw)[:3]
    once, twice = FleetState(), FleetState()
    feed(once, gw, events)
    for e in events:
        assert twice.ingest(*gw.wire(e), T0) == "alert"
        assert twice.ingest(*gw.wire(e), T0) == "duplicate"
    assert feed(twice, gw, events) == ["duplicate"] * 3
    a, b = once.snapshot(T0), twice.snapshot(T0)
    assert a.pop("counts") == {"alert": 3}
    assert b.pop("counts") == {"alert": 3, "duplicate": 6}
    assert a == b


def test_late_older_messages_never_win(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    op, up1, up2, res = lifecycle(gw)
    state = FleetState()
    feed(state, gw, [op, up2])
    assert feed(state, gw, [up1]) == ["stale"]  # n=1 after n=2: the newer figures stay
    assert device(state.snapshot(T0), "gw-a", "pump-01")["open_alert"]["n"] == 2
    feed(state, gw, [res])
    fresh = FleetState()
    assert feed(fresh, gw, [res, up2]) == ["alert", "stale"]  # a resolved alert is not reopened
    assert device(fresh.snapshot(T0), "gw-a", "pump-01")["open_alert"] is None


def test_a_view_started_late_learns_the_alert_from_its_next_update(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    _, up1, _, _ = lifecycle(gw)
    state = FleetState()
    assert feed(state, gw, [up1]) == ["alert"]
    dev = device(state.snapshot(T0), "gw-a", "pump-01")
    assert dev["open_alert"]["alert_id"] == up1.payload["alert_id"] and dev["alerts_opened"] == 1


def test_a_newer_alert_replaces_one_whose_resolve_never_arrived(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, cooldown_s=0.0)
    first = lifecycle(gw)
    second = gw.judge("pump-01", 2.0, 2.0, 2.0)
    assert second[0].payload["alert_id"] != first[0].payload["alert_id"]
    state = FleetState()
    feed(state, gw, [first[0], second[0]])  # the first alert's resolve was lost
    dev = device(state.snapshot(T0), "gw-a", "pump-01")
    assert dev["open_alert"]["alert_id"] == second[0].payload["alert_id"] and dev["alerts_opened"] == 2
    assert feed(state, gw, [first[1]]) == ["stale"]  # the older alert's late update does not come back
    assert (
        device(state.snapshot(T0), "gw-a", "pump-01")["open_alert"]["alert_id"]
        == second[0].payload["alert_id"]
    )


def test_status_online_offline_and_the_last_will(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    will = gw.status("offline", now=T0)  # built at connect, as the uplink does
    for e in lifecycle(gw)[:2]:
        assert gw.uplink.enqueue(e)  # two messages waiting in the real outbox
    state = FleetState()
    assert state.ingest(*gw.status("online", now=T0 + 60), T0 + 60) == "status"
    snap = state.snapshot(T0 + 61)
    (g,) = snap["gateways"]
    assert g["state"] == "online" and g["outbox"] == {"depth": 2, "dropped": 0}
    assert [d["device"] for d in g["devices"]] == ["pump-01", "pump-02"]
    assert all(d["in_status"] for d in g["devices"]) and g["model_id"] == "model-a"
    # the broker publishes the will (older ts) when the gateway vanishes: offline, newer figures kept
    assert state.ingest(*will, T0 + 200, retained=False) == "status"
    (g,) = state.snapshot(T0 + 200)["gateways"]
    assert g["state"] == "offline" and g["status_ts"] == T0 + 60 and g["outbox"]["depth"] == 2
    assert state.ingest(*gw.status("online", now=T0 + 300), T0 + 300) == "status"
    assert state.snapshot(T0 + 300)["gateways"][0]["state"] == "online"
    assert state.ingest(*gw.status("online", now=T0 + 250), T0 + 301) == "stale"  # older online status


def test_a_silent_gateway_turns_stale_and_a_retained_status_counts_at_its_own_time(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    state = FleetState(stale_after_s=180)
    state.ingest(*gw.status("online", now=T0), T0 + 100, retained=True)  # retained, 100 s old
    (g,) = state.snapshot(T0 + 100)["gateways"]
    assert g["last_seen"] == T0 and g["state"] == "online"
    assert state.snapshot(T0 + 181)["gateways"][0]["state"] == "stale"
    state.ingest(*gw.wire(lifecycle(gw)[0]), T0 + 181)  # any message from it counts as a sign of life
    assert state.snapshot(T0 + 200)["gateways"][0]["state"] == "online"
    assert FleetState().snapshot(T0)["gateways"] == []


def test_health_episodes_per_device_including_a_port(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    events: list[Event] = []
    for i in range(5):
        events += gw.health.observe_reject(Reject("checksum", "CRC mismatch"), "/dev/ttyUSB0", T0 + i)
    (raised,) = events
    (cleared,) = gw.health.tick(T0 + 200)
    topic, _ = gw.wire(raised)
    assert topic == "edgewatch/gw-a/_dev_ttyUSB0/health"
    state = FleetState()
    assert feed(state, gw, [raised]) == ["health"]
    dev = device(state.snapshot(T0), "gw-a", "/dev/ttyUSB0")
    assert [h["kind"] for h in dev["health"]] == ["garbage"] and dev["open_alert"] is None
    assert "garbage" in render(state, T0)
    assert feed(state, gw, [cleared, raised]) == ["health", "duplicate"]
    assert device(state.snapshot(T0), "gw-a", "/dev/ttyUSB0")["health"] == []


def test_a_multi_level_prefix(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, prefix="plant/north")
    op = lifecycle(gw)[0]
    assert gw.wire(op)[0] == "plant/north/gw-a/pump-01/alert"
    state = FleetState("plant/north")
    assert state.topics == ["plant/north/+/status", "plant/north/+/+/alert", "plant/north/+/+/health"]
    assert feed(state, gw, [op]) == ["alert"]
    assert FleetState("edgewatch").ingest(*gw.wire(op), T0) == "unknown_topic"


def _mutated(payload: dict, **changes: object) -> bytes:
    p = dict(payload)
    for k, v in changes.items():
        if v is KeyError:
            del p[k]
        else:
            p[k] = v
    return json.dumps(p).encode()


def test_malformed_and_unknown_messages_are_counted_and_ignored(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    op = lifecycle(gw)[0]
    topic, raw = gw.wire(op)
    p = json.loads(raw)
    status_topic, status_raw = gw.status("online", now=T0)
    s = json.loads(status_raw)
    cases = [
        (topic, b"\xff\xfe not utf-8", "not_json"),
        (topic, b"{truncated", "not_json"),
        (topic, b"[1, 2]", "not_json"),
        (topic, b"", "not_json"),
        (topic, _mutated(p, v=2), "unsupported"),
        (topic, _mutated(p, type="health"), "invalid"),
        (topic, _mutated(p, score=None), "invalid"),  # a NaN that left a stage
        (topic, _mutated(p, peak="high"), "invalid"),
        (topic, _mutated(p, severity="meh"), "invalid"),
        (topic, _mutated(p, state="closed"), "invalid"),
        (topic, _mutated(p, windows=True), "invalid"),
        (topic, _mutated(p, top_sensors=[1, 2]), "invalid"),
        (topic, _mutated(p, msg_id="abc:0"), "invalid"),
        (topic, _mutated(p, msg_id=p["alert_id"] + ":1"), "invalid"),  # n=1 with state open
        (topic, _mutated(p, alert_id=KeyError), "invalid"),
        (topic, _mutated(p, gateway="gw-b"), "invalid"),  # payload and topic disagree
        (topic, _mutated(p, device="pump-09"), "invalid"),
        (topic, _mutated(p, resolved_ts=T0), "invalid"),
        (status_topic, _mutated(s, outbox={"depth": -1, "dropped": 0}), "invalid"),
        (status_topic, _mutated(s, devices="pump-01"), "invalid"),
        (status_topic, _mutated(s, state="sleeping"), "invalid"),
        ("edgewatch/gw-a/pump-01/drift", raw, "unknown_topic"),
        ("edgewatch/gw-a", raw, "unknown_topic"),
        ("other/gw-a/pump-01/alert", raw, "unknown_topic"),
    ]
    state = FleetState()
    for t, payload, reason in cases:
        assert state.ingest(t, payload, T0) == reason, (t, payload)
    snap = state.snapshot(T0)
    assert snap["gateways"] == []  # nothing invalid created a gateway or a device
    assert sum(snap["counts"].values()) == len(cases) and len(snap["last_ignored"]) == 5
    assert "ignored:" in render(state, T0)
    assert state.ingest(topic, raw, T0) == "alert"  # and the view still works


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["edgewatch/gw-a/pump-01/alert", "edgewatch/gw-a/status", "edgewatch/x/y/health"])
    | st.text(max_size=40),
    st.binary(max_size=200)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=6),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode()),
)
def test_arbitrary_input_never_raises(topic: str, payload: bytes) -> None:
    state = FleetState()
    outcome = state.ingest(topic, payload, T0)
    assert outcome in FleetState.IGNORED
    render(state, T0)
    json.dumps(state.snapshot(T0), allow_nan=False)


def test_render_is_plain_text_and_pure(tmp_path: Path) -> None:
    a, b = Gateway(tmp_path, "gw-a"), Gateway(tmp_path, "gw-b")
    state = FleetState()
    state.ingest(*a.status("online", now=T0), T0)
    state.ingest(*b.status("offline", now=T0), T0)
    feed(state, a, lifecycle(a)[:2], now=T0 + 5)
    text = render(state, T0 + 65)
    assert text == render(state, T0 + 65) and "\x1b" not in text
    lines = text.splitlines()
    assert "2 gateways (1 offline, 1 online), 4 devices, 1 open alert (1 critical)" in lines[1]
    header = next(line for line in lines if line.startswith("GATEWAY  STATE"))
    assert header.split() == ["GATEWAY", "STATE", "SEEN", "OUTBOX", "DROPPED", "DEVICES", "ALERTS", "UPTIME",
                              "MODEL"]  # fmt: skip
    row = next(line for line in lines if line.startswith("gw-a ") and "online" in line).split()
    assert row[:7] == ["gw-a", "online", "1m", "0", "0", "2", "1"]
    alert_row = next(line for line in lines if line.startswith("gw-a ") and "critical" in line)
    assert "pump-01" in alert_row and "vibration" in alert_row
    assert "no gateway has reported yet" in render(FleetState(), T0)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "fleet.md").read_text()
    columns = {c for line in lines if line.startswith("GATEWAY ") for c in line.split("  ") if c.strip()}
    undocumented = {c.strip() for c in columns if f"`{c.strip()}`" not in doc}
    assert undocumented == set(), f"columns missing from docs/fleet.md: {undocumented}"


def test_fleet_arguments_and_config(tmp_path: Path) -> None:
    parse = build_parser().parse_args
    cfg = tmp_path / "ew.toml"
    cfg.write_text(
        '[gateway]\nid = "gw-a"\n[uplink]\ntopic_prefix = "plant"\nclient_id = "edgewatch-gw-a"\n'
        '[uplink.mqtt]\nhost = "broker.example.net"\ntls = true\nusername = "ops"\npassword_env = "PW"\n'
    )
    conn, prefix = connection_from_args(parse(["fleet", "--config", str(cfg)]))
    assert (conn.host, conn.effective_port, conn.tls, conn.username, prefix) == (
        "broker.example.net", 8883, True, "ops", "plant",
    )  # fmt: skip
    conn, prefix = connection_from_args(
        parse(["fleet", "--config", str(cfg), "--broker", "b2:9999", "--prefix", "x"])
    )
    assert (conn.host, conn.port, conn.tls, prefix) == ("b2", 9999, True, "x")
    bad = tmp_path / "bad.toml"
    bad.write_text("[uplink]\nqos = 2\n")
    for argv, message in [
        (["fleet"], "give --broker"),
        (["fleet", "--broker", "10.1.2.3", "--username", "u", "--password-env", "PW"], "clear text"),
        (["fleet", "--broker", "h:99999"], "port must be"),
        (["fleet", "--config", str(bad)], "uplink.qos"),
        (["fleet", "--config", str(tmp_path / "missing.toml")], "cannot read"),
        (["fleet", "--broker", "h:1", "--prefix", "a/#"], "wildcard"),
        (["fleet", "--broker", "h:1", "--stale-after", "0"], "stale_after_s"),
    ]:
        out = subprocess.run([EDGEWATCH, *argv], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and message in out.stderr, (argv, out.stderr)


def test_no_broker_is_an_error_not_an_empty_table(tmp_path: Path) -> None:
    from conftest import free_port

    port = free_port()  # nobody listens on it
    t = time.monotonic()
    assert main(["fleet", "--broker", f"127.0.0.1:{port}", "--once", "0.5"]) == 1
    assert time.monotonic() - t < 20


# -- end to end ------------------------------------------------------------------------------------


def start_gateway(broker: Broker, tmp_path: Path, procs: list, name: str, *sim_args: str) -> subprocess.Popen:
    """The simulator on a pty and `edgewatch run` as gateway `name`, own state dir and database,
    heartbeat every second (so the status lists its devices soon)."""
    sim, pty = start_sim_pty(*sim_args)
    procs.append(sim)
    home = tmp_path / name
    home.mkdir()
    cfg = write_config(home / "ew.toml", home / "state", broker, serial_source(pty))
    text = cfg.read_text().replace('id = "gw-test"', f'id = "{name}"')
    cfg.write_text(text + "\n[scheduler]\nstatus_interval_s = 1\n")
    agent = start_agent(cfg, home / "agent.log")
    procs.append(agent)
    return agent


def fleet(broker: Broker, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [EDGEWATCH, "fleet", "--broker", broker.address, *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.timeout(120)
def test_two_gateways_on_one_broker(broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    # A persistent session registered first: the broker queues every alert for the view from now on,
    # so the snapshot taken later includes the alert opened in between (as a consumer should, docs/mqtt.md).
    first = json.loads(fleet(broker, "--client-id", "fleet-e2e", "--once", "0.3", "--json").stdout)
    assert first["gateways"] == [] and first["connected"]
    sub = Subscriber(broker)
    gw_a = start_gateway(
        broker, tmp_path, procs, "gw-a",
        "--seed", "7", "--devices", "2", "--speed", "50", "--scenario", "bearing_wear",
        "--fault-after", "300", "--degradation", "600",
    )  # fmt: skip
    gw_b = start_gateway(broker, tmp_path, procs, "gw-b", "--seed", "3", "--devices", "1", "--speed", "50")
    try:
        _, alert = sub.wait_for(lambda t, p: t == "edgewatch/gw-a/pump-01/alert" and p["state"] == "open", 90)
        sub.wait_for(lambda t, p: t == "edgewatch/gw-b/status" and p["devices"] == ["pump-01"], 30)
        sub.wait_for(lambda t, p: t == "edgewatch/gw-a/status" and len(p["devices"]) == 2, 30)
    finally:
        sub.close()
    snap = json.loads(fleet(broker, "--client-id", "fleet-e2e", "--once", "1.5", "--json").stdout)
    gws = {g["gateway"]: g for g in snap["gateways"]}
    assert set(gws) == {"gw-a", "gw-b"}, snap
    assert all(g["state"] == "online" for g in gws.values())
    assert [d["device"] for d in gws["gw-a"]["devices"]] == ["pump-01", "pump-02"]
    assert [d["device"] for d in gws["gw-b"]["devices"]] == ["pump-01"]
    for g in gws.values():
        assert isinstance(g["outbox"]["depth"], int) and g["outbox"]["dropped"] == 0
    opened = device(snap, "gw-a", "pump-01")["open_alert"]
    assert opened is not None and opened["alert_id"] == alert["alert_id"]
    assert opened["top_sensors"][0]["channel"] == "vibration"
    assert gws["gw-a"]["open_alerts"] >= 1 and gws["gw-b"]["open_alerts"] == 0
    assert not set(snap["counts"]) & set(FleetState.IGNORED), snap["counts"]

    # a clean stop leaves a retained offline status: a fresh view (text, not a tty) shows it
    assert stop(gw_b) == 0
    text = fleet(broker, "--once", "1").stdout
    rows = [line.split() for line in text.splitlines()]
    assert next(r for r in rows if r and r[0] == "gw-b")[:2] == ["gw-b", "offline"], text
    assert next(r for r in rows if r and r[0] == "gw-a")[:2] == ["gw-a", "online"], text
    assert stop(gw_a) == 0
    assert "Traceback" not in (tmp_path / "gw-a" / "agent.log").read_text()
