"""CSV recordings: determinism, format of docs/protocol.md, and how each sensor fault shows up."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from firmware_sim.pump import SENSOR_FAULT_LABELS, WIRE_DROPOUT, WIRE_GARBAGE, WIRE_OK, simulate
from firmware_sim.record import HEADER
from firmware_sim.scenario import SENSOR_FAULTS, build_scenario

START = 1_764_547_200_000  # 2025-12-01T00:00:00Z
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record_cli(path: Path, *extra: str) -> Path:
    assert main(["sim", "record", "--out", str(path), *extra]) == 0
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    args = ("--devices", "2", "--hours", "1.5", "--scenario", "mixed")
    a = record_cli(tmp_path / "a.csv", "--seed", "4", *args).read_bytes()
    b = record_cli(tmp_path / "b.csv", "--seed", "4", *args).read_bytes()
    c = record_cli(tmp_path / "c.csv", "--seed", "5", *args).read_bytes()
    assert a == b
    assert a != c
    assert a.count(b"\n") == c.count(b"\n") == 1 + 2 * 5400


def test_csv_format_sorting_and_labels(tmp_path: Path) -> None:
    path = record_cli(tmp_path / "r.csv", "--seed", "1", "--devices", "3", "--hours", "2", "--rate", "2")
    text = path.read_text()
    assert text.startswith(HEADER)
    rows = read_rows(path)
    assert len(rows) == 3 * 2 * 3600 * 2
    keys = [(r["ts"], r["device"]) for r in rows]
    assert keys == sorted(keys)
    assert {r["device"] for r in rows} == {"pump-01", "pump-02", "pump-03"}
    assert rows[0]["ts"] == "2026-12-01T00:00:00.000Z" and rows[3]["ts"] == "2026-12-01T00:00:00.500Z"
    for r in rows[::997]:
        assert ISO.match(r["ts"])
        assert re.fullmatch(r"-?\d+\.\d{2}", r["temperature"])
        assert re.fullmatch(r"-?\d+\.\d{3}", r["vibration"])
        assert re.fullmatch(r"-?\d+\.\d{3}", r["pressure"])
        assert (r["machine_state"], r["fault"], r["sensor_fault"]) == ("normal", "", "")


def test_start_option_and_ground_truth_columns(tmp_path: Path) -> None:
    path = record_cli(
        tmp_path / "bw.csv",
        *("--seed", "2", "--devices", "2", "--duration", "1200", "--scenario", "bearing_wear"),
        *("--fault-after", "300", "--degradation", "600", "--start", "2030-01-02T03:04:05Z"),
    )
    rows = read_rows(path)
    assert rows[0]["ts"] == "2030-01-02T03:04:05.000Z"
    p1 = [r for r in rows if r["device"] == "pump-01"]
    p2 = [r for r in rows if r["device"] == "pump-02"]
    assert [r["machine_state"] for r in p1[299:301]] == ["normal", "degrading"]
    assert [r["machine_state"] for r in p1[899:901]] == ["degrading", "failed"]
    assert {r["fault"] for r in p1[300:]} == {"bearing_wear"}
    assert {r["machine_state"] for r in p2} == {"normal"}  # the other pump is the healthy reference


def test_bad_arguments_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="devices"):
        main(["sim", "record", "--out", str(tmp_path / "x.csv"), "--devices", "0"])
    with pytest.raises(SystemExit):
        main(["sim", "record", "--out", str(tmp_path / "x.csv"), "--scenario", "nope"])
    with pytest.raises(SystemExit):
        main(["sim", "record", "--out", str(tmp_path / "x.csv"), "--start", "yesterday"])
    assert not (tmp_path / "x.csv").exists()


# --- sensor faults -------------------------------------------------------------------------------

ONSET, DUR, TOTAL = 1800.0, 1800.0, 5400.0


def sensor_run(kind: str):
    sc = build_scenario(f"sensor_{kind}", devices=1, horizon=TOTAL, fault_after=ONSET, degradation=DUR)
    normal = simulate(9, 0, build_scenario("normal", 1, TOTAL), START, TOTAL)
    c = simulate(9, 0, sc, START, TOTAL)
    t = (c.ts_ms - START) / 1000.0
    inside = (t >= ONSET) & (t < ONSET + DUR)
    return c, normal, inside, sc.sensor_faults[0].channel


@pytest.mark.parametrize("kind", SENSOR_FAULTS)
def test_sensor_fault_labels_and_machine_untouched(kind: str) -> None:
    c, normal, inside, _ = sensor_run(kind)
    assert np.all(c.sensor_fault[inside] == SENSOR_FAULT_LABELS.index(kind))
    assert np.all(c.sensor_fault[~inside] == 0)
    assert np.all(c.machine_state == 0) and np.all(c.fault == 0)
    for ch in ("temperature", "vibration", "pressure"):  # outside the fault, the sensor is fine
        np.testing.assert_array_equal(getattr(c, ch)[~inside], getattr(normal, ch)[~inside])


def test_stuck_is_constant() -> None:
    c, normal, inside, ch = sensor_run("stuck")
    assert len(np.unique(getattr(c, ch)[inside])) == 1
    assert len(np.unique(getattr(normal, ch)[inside])) > 50
    assert getattr(c, ch)[inside][0] == getattr(normal, ch)[inside][0]  # frozen at the onset value


def test_dropout_sends_nothing_and_records_empty(tmp_path: Path) -> None:
    c, _, inside, _ = sensor_run("dropout")
    assert np.all(c.wire[inside] == WIRE_DROPOUT) and np.all(c.wire[~inside] == WIRE_OK)
    path = record_cli(
        tmp_path / "d.csv",
        *("--devices", "1", "--seed", "9", "--duration", "600", "--scenario", "sensor_dropout"),
        *("--fault-after", "100", "--degradation", "50"),
    )
    rows = read_rows(path)
    assert len(rows) == 600  # the rows and their labels stay
    for r in rows[100:150]:
        assert (r["temperature"], r["vibration"], r["pressure"], r["sensor_fault"]) == ("", "", "", "dropout")
    assert all(r["temperature"] != "" for r in rows[150:])


def test_garbage_is_intermittent_and_recorded_empty(tmp_path: Path) -> None:
    c, _, inside, _ = sensor_run("garbage")
    frac = np.mean(c.wire[inside] == WIRE_GARBAGE)
    assert 0.25 < frac < 0.55
    assert np.all(c.wire[~inside] == WIRE_OK)
    assert np.all(np.isnan(c.temperature[c.wire == WIRE_GARBAGE]))
    path = record_cli(
        tmp_path / "g.csv",
        *("--devices", "1", "--seed", "9", "--duration", "400", "--scenario", "sensor_garbage"),
        *("--fault-after", "100", "--degradation", "200"),
    )
    rows = read_rows(path)[100:300]
    empty = [r for r in rows if r["pressure"] == ""]
    assert 40 < len(empty) < 120 and all(r["sensor_fault"] == "garbage" for r in rows)


def test_nan_is_recorded_as_nan(tmp_path: Path) -> None:
    c, _, inside, ch = sensor_run("nan")
    frac = np.mean(np.isnan(getattr(c, ch)[inside]))
    assert 0.35 < frac < 0.65
    assert not np.isnan(getattr(c, ch)[~inside]).any()
    path = record_cli(
        tmp_path / "n.csv",
        *("--devices", "1", "--seed", "9", "--duration", "400", "--scenario", "sensor_nan"),
        *("--fault-after", "100", "--degradation", "200"),
    )
    vals = [r[ch] for r in read_rows(path)]
    assert "nan" in vals[100:300] and "" not in vals and "nan" not in vals[:100] + vals[300:]
    assert all(math.isnan(float(v)) for v in vals if v == "nan")


def test_spikes_are_rare_and_large() -> None:
    c, normal, inside, ch = sensor_run("spikes")
    d = np.abs(getattr(c, ch) - getattr(normal, ch))
    frac = np.mean(d[inside] > 1.0)
    assert 0.01 < frac < 0.06
    assert np.all(d[~inside] == 0)


def test_drift_ramps_then_recalibrates() -> None:
    c, normal, inside, ch = sensor_run("drift")
    d = getattr(c, ch) - getattr(normal, ch)
    ramp = d[inside]
    assert ramp[-1] > 5.0 and abs(ramp[0]) < 0.01
    assert np.corrcoef(np.arange(len(ramp)), ramp)[0, 1] > 0.999  # slow linear drift
    assert np.all(d[~inside] == 0)


def test_mixed_has_sensor_faults_on_every_device() -> None:
    sc = build_scenario("mixed", devices=3, horizon=86400, seed=1)
    assert {f.device for f in sc.sensor_faults} == {0, 1, 2}
    for d in range(3):
        fs = sorted(sc.sensor_faults_of(d), key=lambda f: f.start)
        assert fs[0].start + fs[0].duration <= fs[1].start  # no overlap on one device


def test_recording_equals_simulation_arrays(tmp_path: Path) -> None:
    """The file carries exactly the simulated numbers (the streams are checked against the same)."""
    path = record_cli(
        tmp_path / "eq.csv",
        *("--seed", "6", "--devices", "2", "--duration", "5000", "--scenario", "mixed"),
        *("--start", "2025-12-01T00:00:00Z"),
    )
    rows = [r for r in read_rows(path) if r["device"] == "pump-02"]
    c = simulate(6, 1, build_scenario("mixed", 2, 5000, seed=6), START, 5000)
    assert len(rows) == len(c) == 5000
    for ch in ("temperature", "vibration", "pressure"):
        got = np.array([float(r[ch]) if r[ch] else np.nan for r in rows])
        np.testing.assert_array_equal(got, getattr(c, ch))
    assert [r["sensor_fault"] for r in rows] == [SENSOR_FAULT_LABELS[i] for i in c.sensor_fault]


def test_endless_mixed_repeats_its_day_of_faults() -> None:
    day = 86400.0
    sc = build_scenario("mixed", devices=2, horizon=day, seed=1)
    rep = sc.repeated(day, 3)
    assert len(rep.machine_faults) == 3 * len(sc.machine_faults)
    assert [f.start - day for f in rep.machine_faults_of(1)[2:4]] == [
        f.start for f in sc.machine_faults_of(1)
    ]
    c = simulate(1, 0, rep, START, 2 * day)
    n = int(day)
    assert c.fault[:n].any()
    np.testing.assert_array_equal(c.fault[:n], c.fault[n:])
    np.testing.assert_array_equal(c.sensor_fault[:n], c.sensor_fault[n:])
