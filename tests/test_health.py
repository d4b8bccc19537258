"""Sensor health: each kind raises once per episode and clears once; garbage goes to its origin."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import metrics
from agent.health import REJECT_KINDS, HealthConfig, HealthMonitor
from agent.types import Event, Reading, Reject

CFG = HealthConfig()  # silence 30 s, stuck 30, reject 5 within 60 s, clear after 60 s
T0 = 1_764_806_400.0
PAYLOAD_KEYS = {"v", "type", "msg_id", "event_id", "state", "gateway", "device", "channel", "kind", "ts",
                "detail", "count"}  # fmt: skip


def reading(t: float, device: str = "pump-01", **values: float) -> Reading:
    vals = {"temperature": 40.0 + t % 7, "vibration": 2.0 + t % 3 / 10, "pressure": 3.0 + t % 5 / 10}
    vals.update(values)
    return Reading(device=device, ts=t, values=vals, received=t + 0.05)


def schema_errors(name: str, payload: dict) -> list[str]:
    """Violations of agent/schemas/<name>.json, the contract the uplink's consumers validate against."""
    doc = json.loads(resources.files("agent").joinpath("schemas", f"{name}.json").read_text())
    return [e.message for e in jsonschema.Draft202012Validator(doc).iter_errors(payload)]


def health_count(kind: str, state: str) -> float:
    labels = {"kind": kind, "state": state}
    return metrics.REGISTRY.get_sample_value("edgewatch_health_events_total", labels) or 0.0


def check_pair(raised: Event, cleared: Event, kind: str, device: str, channel: str | None) -> None:
    for ev in (raised, cleared):
        assert ev.topic_kind == "health" and ev.device == device
        assert set(ev.payload) == PAYLOAD_KEYS and schema_errors("health", ev.payload) == []
        assert ev.payload["kind"] == kind and ev.payload["channel"] == channel
        assert ev.payload["device"] == device and ev.payload["gateway"] == "gw-01"
    eid = raised.payload["event_id"]
    assert len(eid) == 16 and cleared.payload["event_id"] == eid
    assert raised.payload["state"] == "raised" and raised.payload["msg_id"] == f"{eid}:0"
    assert cleared.payload["state"] == "cleared" and cleared.payload["msg_id"] == f"{eid}:1"


def test_silence_raised_by_tick_once_and_cleared_by_the_next_reading() -> None:
    h = HealthMonitor(CFG, "gw-01")
    assert h.tick(T0 + 1000) == []  # nobody known yet: nobody silent
    assert h.observe_reading(reading(T0)) == []
    assert h.tick(T0 + 29) == []
    before = health_count("silent", "raised")
    (raised,) = h.tick(T0 + 31.25)
    assert health_count("silent", "raised") == before + 1
    assert h.tick(T0 + 40) == [] and h.tick(T0 + 100) == []
    assert raised.payload["ts"] == T0 + 31.25 and "no reading for 31.2 s" in raised.payload["detail"]
    (cleared,) = h.observe_reading(reading(T0 + 120))
    check_pair(raised, cleared, "silent", "pump-01", None)
    assert h.observe_reading(reading(T0 + 121)) == [] and h.tick(T0 + 125) == []
    (again,) = h.tick(T0 + 200)  # a new episode gets a new id
    assert again.payload["event_id"] != raised.payload["event_id"]


def test_stuck_channel_raised_once_and_cleared_when_it_moves() -> None:
    h = HealthMonitor(CFG, "gw-01")
    events = [ev for i in range(29) for ev in h.observe_reading(reading(T0 + i, pressure=3.3))]
    assert events == []
    (raised,) = h.observe_reading(reading(T0 + 29, pressure=3.3))
    assert raised.payload["count"] == 30
    events = [ev for i in range(30, 80) for ev in h.observe_reading(reading(T0 + i, pressure=3.3))]
    assert events == []
    (cleared,) = h.observe_reading(reading(T0 + 80, pressure=3.31))
    check_pair(raised, cleared, "stuck", "pump-01", "pressure")
    assert cleared.payload["count"] == 80


def test_stuck_tolerates_eps_and_ignores_missing_values() -> None:
    h = HealthMonitor(CFG.model_copy(update={"stuck_eps": 0.02}), "gw-01")
    events = []
    for i in range(40):
        value = float("nan") if i % 4 == 0 else 5.0 + (i % 3) * 0.01  # NaN neither extends nor breaks
        events += h.observe_reading(reading(T0 + i, vibration=value))
    assert [e.payload["kind"] for e in events] == ["stuck"] and events[0].payload["channel"] == "vibration"
    assert events[0].payload["count"] == 30
    # varied channels never look stuck
    h2 = HealthMonitor(CFG, "gw-01")
    assert [e for i in range(200) for e in h2.observe_reading(reading(T0 + i))] == []


@pytest.mark.parametrize(
    ("reason", "kind"), [("range", "out_of_range"), ("nan", "nan"), ("checksum", "garbage")]
)
def test_reject_bursts_raise_once_and_clear_after_quiet(reason: str, kind: str) -> None:
    h = HealthMonitor(CFG, "gw-01")
    rej = Reject(reason=reason, detail="pressure=999", device="pump-01")
    assert [e for i in range(4) for e in h.observe_reject(rej, "/dev/ttyUSB0", T0 + i)] == []
    (raised,) = h.observe_reject(rej, "/dev/ttyUSB0", T0 + 4)
    assert raised.payload["count"] == 5 and "pressure=999" in raised.payload["detail"]
    assert [e for i in range(5, 20) for e in h.observe_reject(rej, "/dev/ttyUSB0", T0 + i)] == []
    assert h.tick(T0 + 19 + 59) == []  # 59 s since the last offence
    (cleared,) = h.tick(T0 + 19 + 60)
    check_pair(raised, cleared, kind, "pump-01", None)
    assert cleared.payload["count"] == 20
    assert h.tick(T0 + 500) == []


def test_sparse_rejects_do_not_raise() -> None:
    h = HealthMonitor(CFG, "gw-01")
    rej = Reject(reason="nan", detail="vibration", device="pump-01")
    assert [
        e for i in range(100) for e in h.observe_reject(rej, "edgewatch/sensors/pump-01", T0 + 15 * i)
    ] == []


@pytest.mark.parametrize("reason", ["encoding", "checksum", "syntax", "too_long", "version", "schema"])
def test_garbage_without_device_is_attributed_to_the_origin(reason: str) -> None:
    assert REJECT_KINDS[reason] == "garbage"
    h = HealthMonitor(CFG, "gw-01")
    rej = Reject(reason=reason, detail="bad line", device=None, raw=b"\xff\xfe")
    events = [e for i in range(5) for e in h.observe_reject(rej, "/dev/ttyUSB0", T0 + i)]
    (raised,) = events
    assert raised.device == "/dev/ttyUSB0" and raised.payload["device"] == "/dev/ttyUSB0"
    assert raised.payload["kind"] == "garbage" and "origin /dev/ttyUSB0" in raised.payload["detail"]
    (cleared,) = h.tick(T0 + 4 + 60)
    check_pair(raised, cleared, "garbage", "/dev/ttyUSB0", None)


@pytest.mark.parametrize("reason", ["duplicate", "out_of_order", "future"])
def test_timing_rejects_are_not_sensor_faults(reason: str) -> None:
    h = HealthMonitor(CFG, "gw-01")
    rej = Reject(reason=reason, detail="seq 4", device="pump-01")
    assert [e for i in range(50) for e in h.observe_reject(rej, "/dev/ttyUSB0", T0 + i)] == []


def test_a_device_sending_only_bad_data_is_not_also_silent() -> None:
    h = HealthMonitor(CFG, "gw-01")
    h.observe_reading(reading(T0))
    (silent,) = h.tick(T0 + 40)
    assert silent.payload["kind"] == "silent"
    rej = Reject(reason="nan", detail="temperature", device="pump-01")
    (cleared,) = h.observe_reject(rej, "/dev/ttyUSB0", T0 + 41)
    assert cleared.payload["kind"] == "silent" and cleared.payload["state"] == "cleared"
    for i in range(42, 100):
        events = h.observe_reject(rej, "/dev/ttyUSB0", T0 + i) + h.tick(T0 + i)
        assert all(e.payload["kind"] == "nan" for e in events)


def test_ids_are_deterministic_and_kinds_are_independent() -> None:
    def run() -> list[dict]:
        h = HealthMonitor(CFG, "gw-01")
        out = []
        for i in range(100):
            out += h.observe_reading(reading(T0 + i, pressure=1.0))
            if 20 <= i < 30:
                out += h.observe_reject(Reject("range", "temperature=900", "pump-01"), "p", T0 + i)
            out += h.tick(T0 + i + 0.5)
        return [e.payload for e in out]

    first = run()
    assert first == run()
    assert sorted((p["kind"], p["state"]) for p in first) == [
        ("out_of_range", "cleared"),
        ("out_of_range", "raised"),
        ("stuck", "raised"),
    ]


step_st = st.tuples(
    st.sampled_from(["reading", "stuck_reading", "range", "nan", "garbage", "duplicate", "tick"]),
    st.floats(min_value=0.1, max_value=40.0),
)


@settings(max_examples=80, deadline=None)
@given(steps=st.lists(step_st, max_size=150))
def test_each_episode_is_raised_once_and_cleared_at_most_once(steps: list[tuple[str, float]]) -> None:
    h = HealthMonitor(CFG.model_copy(update={"stuck_n": 5, "reject_k": 3}), "gw-01")
    t, events = T0, []
    for kind, dt in steps:
        t += dt
        if kind == "reading":
            events += h.observe_reading(reading(t))
        elif kind == "stuck_reading":
            events += h.observe_reading(reading(t, pressure=1.0))
        elif kind == "tick":
            events += h.tick(t)
        else:
            device = None if kind == "garbage" else "pump-01"
            reason = "syntax" if kind == "garbage" else kind
            events += h.observe_reject(Reject(reason, "x", device), "/dev/ttyUSB0", t)
    states: dict[str, list[str]] = {}
    active: set[tuple] = set()
    for ev in events:
        p = ev.payload
        assert schema_errors("health", p) == []
        assert (
            set(p) == PAYLOAD_KEYS and p["msg_id"] == f"{p['event_id']}:{0 if p['state'] == 'raised' else 1}"
        )
        states.setdefault(p["event_id"], []).append(p["state"])
        key = (p["device"], p["channel"], p["kind"])
        if p["state"] == "raised":
            assert key not in active
            active.add(key)
        else:
            active.remove(key)
    assert all(s in (["raised"], ["raised", "cleared"]) for s in states.values())
    assert {(a["device"], a["channel"], a["kind"]) for a in h.active()} == active


def test_ticking_only_when_next_due_says_so_emits_what_ticking_every_second_emits() -> None:
    """Replay ticks only from `next_due()` on, which is cached between readings. Bursts of devices
    (known and new) with gaps, rejects with and without a device: the events must equal those of a
    monitor ticked every second, and the cached due never later than a fresh computation."""
    import random

    rnd = random.Random(3)
    cfg = HealthConfig(silence_s=5.0, reject_k=2, reject_window_s=10.0, clear_s=4.0, stuck_n=3)
    mon, ref = HealthMonitor(cfg, "gw"), HealthMonitor(cfg, "gw")
    got: list[Event] = []
    want: list[Event] = []
    now = next_tick = 1_764_806_400.0
    for burst in range(600):
        device = rnd.choice(["a", "b", "c", f"new{burst}"])
        for _ in range(rnd.randrange(1, 12)):
            now += rnd.choice([0.5, 1.0, 1.0, 2.0])
            while now >= next_tick:
                want += ref.tick(next_tick)
                if next_tick >= mon.next_due():
                    got += mon.tick(next_tick)
                next_tick += 1.0
            action, x = rnd.random(), float(rnd.choice([1, 2]))
            for m, out in ((mon, got), (ref, want)):
                if action < 0.85:
                    out += m.observe_reading(Reading(device, now, {"x": x, "y": 0.5}))
                elif action < 0.95:
                    out += m.observe_reject(Reject("nan", "x is nan", device), "port", now)
                else:
                    out += m.observe_reject(Reject("syntax", "bad line", None), "port", now)
            cached = mon.next_due()
            mon._due = None
            assert cached <= mon.next_due()
        now += rnd.choice([0.0, 2.0, 10.0, 40.0])
    assert [e.payload for e in got] == [e.payload for e in want]
    assert any(e.payload["kind"] == "silent" for e in want)
