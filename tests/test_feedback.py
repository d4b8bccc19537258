"""The analyst feedback loop end to end: an alert on a new-but-normal operating point, labelled a false
positive, exported as training data, retrained on, and gone on replay; without the label it stays."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.command import parse_command, store_label
from agent.db import open_db
from agent.export import Span, export_readings, row_labels
from agent.types import Reading
from training.synth import write_synth_csv

TINY = ["--window", "32", "--stride", "4", "--hidden", "16", "--epochs", "8", "--max-train-windows", "1024"]


def test_row_labels_follow_the_verdicts_with_precedence() -> None:
    rows = [Reading("p1", float(t), {"x": 1.0}) for t in range(10)] + [Reading("p2", 5.0, {"x": 1.0})]
    spans = [
        Span("p1", 1, 3, "false_positive"),
        Span("p1", 3, 4, "true_positive"),  # overlaps the false positive at t=3: the fault wins
        Span("p1", 6, 6, "maintenance"),
        Span("p1", 8, float("inf"), None),  # still open, nobody looked at it
    ]
    got = [lab[0] for lab in row_labels(rows, spans)]
    assert got == [
        "normal",
        "normal",
        "normal",
        "degrading",
        "degrading",
        "normal",
        "maintenance",
        "normal",
        "unknown",
        "unknown",
        "normal",  # p2: spans of p1 do not apply
    ]
    assert row_labels(rows, spans)[3] == ("degrading", "labelled_fault", "")


def _alerts(db_path: Path) -> list[tuple]:
    db = open_db(db_path)
    try:
        return db.execute("SELECT alert_id, device, opened_ts, resolved_ts FROM alerts").fetchall()
    finally:
        db.conn.close()


def _replay(incident: Path, model: Path, db: Path) -> list[tuple]:
    assert main(
        ["replay", str(incident), "--model", str(model), "--db", str(db), "--events", str(db) + ".jsonl"]
    ) in (
        0,
        1,
    )
    return _alerts(db)


def test_a_labelled_false_positive_no_longer_alerts_after_retraining(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    train = write_synth_csv(tmp_path / "train.csv", seconds=3600, devices=2, seed=1)
    # pump-01 moves to a new operating point a third of the way in: normal, but never seen in training
    incident = write_synth_csv(
        tmp_path / "incident.csv", seconds=5400, devices=2, seed=2, new_normal_at=1 / 3
    )
    assert main(["train", str(train), "--out", str(tmp_path / "A"), *TINY]) == 0

    alerts = _replay(incident, tmp_path / "A", tmp_path / "gw.db")
    assert alerts and {a[1] for a in alerts} == {"pump-01"}, alerts
    start = 1_764_547_200.0 + 5400 / 3
    assert all(a[2] >= start for a in alerts), "the alert is on the new operating point"

    # before anyone looks: the alert's span is 'unknown' and stays out of training
    assert (
        main(["export", "--db", str(tmp_path / "gw.db"), "--labels", "--out", str(tmp_path / "raw.csv")]) == 0
    )
    # the analyst's verdict, as the command topic delivers it
    db = open_db(tmp_path / "gw.db")
    for alert_id, *_ in alerts:
        cmd = parse_command(
            json.dumps({"type": "label", "alert_id": alert_id, "label": "false_positive"}).encode()
        )
        store_label(db, cmd)  # type: ignore[arg-type]
    db.conn.close()
    assert (
        main(["export", "--db", str(tmp_path / "gw.db"), "--labels", "--out", str(tmp_path / "fp.csv")]) == 0
    )

    with (tmp_path / "raw.csv").open() as f:
        raw = [r for r in csv.DictReader(f) if r["device"] == "pump-01"]
    with (tmp_path / "fp.csv").open() as f:
        fp = [r for r in csv.DictReader(f) if r["device"] == "pump-01"]
    assert len(raw) == len(fp) > 0
    unknown = sum(r["machine_state"] == "unknown" for r in raw)
    assert unknown > 0.5 * (len(raw) - len(raw) / 3) and all(r["machine_state"] == "normal" for r in fp)

    # retrained with the verdict: the new operating point is normal now
    assert main(["train", str(train), str(tmp_path / "fp.csv"), "--out", str(tmp_path / "B"), *TINY]) == 0
    assert _replay(incident, tmp_path / "B", tmp_path / "gw-b.db") == []
    # retrained on the same export without the verdict: the unlabelled span was left out, so it alerts
    assert main(["train", str(train), str(tmp_path / "raw.csv"), "--out", str(tmp_path / "C"), *TINY]) == 0
    assert {a[1] for a in _replay(incident, tmp_path / "C", tmp_path / "gw-c.db")} == {"pump-01"}


def test_export_labels_of_a_database_without_alerts_is_all_normal(tmp_path: Path) -> None:
    from agent.buffer import Buffer, BufferConfig

    db = open_db(tmp_path / "e.db")
    buf = Buffer(db, BufferConfig())
    for t in range(5):
        buf.add(
            Reading("pump-01", 1000.0 + t, {"temperature": 40.0, "vibration": float("nan"), "pressure": 3.0})
        )
    buf.flush()
    db.conn.close()
    assert export_readings(tmp_path / "e.db", tmp_path / "e.csv", with_labels=True) == 5
    with (tmp_path / "e.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["machine_state"] for r in rows] == ["normal"] * 5
    assert rows[0]["vibration"] == "nan"  # a missing value stays missing, never 0
