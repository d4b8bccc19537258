"""Replay: recordings through the live pipeline. Replay must equal live, alert for alert."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from agent_proc import (
    EDGEWATCH,
    MODEL,
    Subscriber,
    agent_on_sim_pty,
    is_open_alert,
    stop,
)
from conftest import Broker

from agent.bundle import load_bundle
from agent.db import open_db
from agent.export import export_readings
from agent.pipeline import StageSettings, build_pipeline
from agent.recording import read_recording
from agent.replay import ReplayResult, replay


def run_replay(paths: list[Path], tmp_path: Path, name: str = "r.db") -> ReplayResult:
    bundle = load_bundle(MODEL)
    recs = []
    for p in paths:
        recs += read_recording(p, channels=bundle.manifest.channel_names)
    db = open_db(tmp_path / name)
    try:
        return replay(recs, lambda e, j: build_pipeline(StageSettings(), bundle, db, e, on_judgement=j))
    finally:
        db.conn.close()


def sim_record(out: Path, *args: str) -> Path:
    subprocess.run([EDGEWATCH, "sim", "record", "--out", str(out), *args], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def bearing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "bearing.csv"
    return sim_record(
        out, "--seed", "11", "--devices", "2", "--duration", "3600", "--scenario", "bearing_wear",
        "--fault-after", "1200", "--degradation", "1200",
    )  # fmt: skip


def test_replay_raises_the_injected_fault_and_nothing_before_it(bearing: Path, tmp_path: Path) -> None:
    result = run_replay([bearing], tmp_path)
    onset = read_recording(bearing)[0].ts[0] + 1200
    spans = result.alert_spans()
    assert "pump-01" in spans
    opened = [s[1] for s in spans["pump-01"]]
    assert any(t >= onset for t in opened), "the bearing-wear fault is alerted"
    assert all(t >= onset for t in opened), f"no alert on pump-01 before the fault: {opened}, onset {onset}"
    # payloads are exactly what the uplink would send
    assert all(p["device"] in ("pump-01", "pump-02") and p["v"] == 1 for p in result.alerts())


def test_replay_is_deterministic(bearing: Path, tmp_path: Path) -> None:
    a = run_replay([bearing], tmp_path, "a.db")
    b = run_replay([bearing], tmp_path, "b.db")
    assert [e.payload for e in a.events] == [e.payload for e in b.events]
    assert a.alert_spans() == b.alert_spans() != {}


def test_replay_saving_alert_state_at_the_end_stores_what_saving_per_event_stores(
    bearing: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay saves alert state on its timer and at the end, not after every event (live does): the
    alerts and state tables must end up the same as with a save per event."""
    import agent.replay as replay_mod

    tables = []
    for name, per_event in (("end.db", False), ("each.db", True)):
        if per_event:
            bulk = replay_mod._bulk_transactions

            def keep_saving(pipeline: object, bulk: object = bulk) -> None:
                bulk(pipeline)  # type: ignore[operator]
                pipeline.alerts.save_on_event = True  # type: ignore[attr-defined]

            monkeypatch.setattr(replay_mod, "_bulk_transactions", keep_saving)
        result = run_replay([bearing], tmp_path, name)
        assert result.alerts()
        with sqlite3.connect(tmp_path / name) as con:
            alerts = sorted(con.execute("SELECT * FROM alerts").fetchall())
            state = sorted(con.execute("SELECT key, value_json FROM state").fetchall())
        tables.append((alerts, state))
    assert tables[0] == tables[1]
    assert tables[0][0] and any(key.startswith("alert") for key, _ in tables[0][1])


def test_cli_replay_writes_events_summary_and_report(bearing: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    out = subprocess.run(
        [EDGEWATCH, "replay", str(bearing), "--model", str(MODEL), "--events", str(events),
         "--report", str(tmp_path / "report")],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    assert any(x["type"] == "alert" and x["state"] == "open" for x in lines)
    assert "alert(s)" in out.stderr and "pump-01" in out.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Against the labels" in report and "events found" in report
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["total"]["event"]["n_detected"] >= 1
    assert (tmp_path / "report" / "pump-01.png").stat().st_size > 10_000


def test_replay_refuses_a_bad_file_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("ts,device,temperature,vibration,pressure\n2026-01-01T00:00:00Z,p,1,2\n")
    out = subprocess.run(
        [EDGEWATCH, "replay", str(bad), "--model", str(MODEL)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "bad.csv:2" in out.stderr


def test_skab_format_replays(tmp_path: Path) -> None:
    """A SKAB-format file (';', CRLF) goes through replay with its own channels."""
    rng = np.random.default_rng(0)
    lines = ["datetime;Pressure;Temperature;anomaly;changepoint"]
    for i in range(300):
        lines.append(
            f"2020-03-09 10:{i // 60:02d}:{i % 60:02d};{1 + rng.normal(0, 0.01):.4f};{60 + rng.normal():.3f};0.0;0.0"
        )
    path = tmp_path / "skab.csv"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    (rec,) = read_recording(path)
    assert rec.channels == ["Pressure", "Temperature"] and len(rec) == 300
    assert rec.anomalous() is not None and not rec.anomalous().any()


@pytest.mark.timeout(240)
def test_replay_equals_live(broker: Broker, tmp_path: Path, procs: list) -> None:
    """Live over a pty into the agent; export what it accepted; replay it: the same alerts, ids and peaks."""
    sub = Subscriber(broker, "edgewatch/gw-test/+/alert")
    agent, _pty = agent_on_sim_pty(
        broker, tmp_path, procs,
        "--seed", "7", "--devices", "2", "--speed", "50", "--scenario", "bearing_wear",
        "--fault-after", "300", "--degradation", "600",
    )  # fmt: skip
    try:
        sub.wait_for(is_open_alert("pump-01"), 120)
        sub.wait_for(lambda t, p: p["state"] == "update", 60)  # let it run a little past the open
    finally:
        sub.close()
    assert stop(agent) == 0
    db_path = tmp_path / "state" / "edgewatch.db"
    with sqlite3.connect(db_path) as db:
        live = sorted(
            db.execute("SELECT alert_id, device, opened_ts, resolved_ts, peak FROM alerts").fetchall()
        )
    assert live, "the live agent raised alerts"

    csv_path = tmp_path / "export.csv"
    assert export_readings(db_path, csv_path) > 500
    result = run_replay([csv_path], tmp_path, "replay.db")
    replayed = sorted(
        (aid, dev, opened, resolved, peak)
        for dev, spans in result.alert_spans().items()
        for aid, opened, resolved, peak in spans
    )
    assert [r[:4] for r in replayed] == [r[:4] for r in live]
    assert np.allclose([r[4] for r in replayed], [r[4] for r in live], rtol=1e-6)

    # the agent's database replays directly too, with the same result
    direct = subprocess.run(
        [EDGEWATCH, "replay", str(db_path), "--model", str(MODEL), "--events", str(tmp_path / "d.jsonl")],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    opened = {
        json.loads(x)["alert_id"] for x in (tmp_path / "d.jsonl").read_text().splitlines() if '"alert"' in x
    }
    assert opened == {r[0] for r in live}, direct.stderr


def test_sensor_faults_are_health_events_not_machine_alerts(tmp_path: Path) -> None:
    rec = sim_record(
        tmp_path / "sf.csv", "--seed", "5", "--devices", "1", "--hours", "3", "--scenario", "sensor_faults"
    )
    result = run_replay([rec], tmp_path)
    raised = {
        (e.payload["kind"])
        for e in result.events
        if e.topic_kind == "health" and e.payload["state"] == "raised"
    }
    assert {"stuck", "silent", "nan"} <= raised, raised
    assert result.alerts() == [], "a sensor fault must not masquerade as a machine anomaly"


def test_export_filters_by_device_and_time_and_round_trips_into_replay(bearing: Path, tmp_path: Path) -> None:
    """`edgewatch export --device --since --until` on a database replay wrote; the export replays."""
    from agent.cli import main
    from agent.recording import iso_utc

    run_replay([bearing], tmp_path, "src.db")
    db = tmp_path / "src.db"
    recs = {r.device: r for r in read_recording(bearing)}
    assert len(recs) >= 2
    dev = sorted(recs)[0]
    ts = recs[dev].ts
    since, until = float(ts[len(ts) // 4]), float(ts[len(ts) // 2])
    out = tmp_path / "part.csv"
    args = ["export", "--db", str(db), "--device", dev, "--since", iso_utc(since), "--until", iso_utc(until)]
    assert main([*args, "--out", str(out)]) == 0
    (got,) = read_recording(out)
    assert got.device == dev
    assert got.ts[0] == since and got.ts[-1] < until  # [since, until)
    assert len(got) == int(((ts >= since) & (ts < until)).sum())
    assert (
        main(["export", "--db", str(db), "--device", "no-such-pump", "--out", str(tmp_path / "x.csv")]) == 1
    )
    assert main(["export", "--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "y.csv")]) == 2
    # the exported slice replays through the pipeline like any recording
    result = run_replay([out], tmp_path, "again.db")
    assert result.readings == len(got)
