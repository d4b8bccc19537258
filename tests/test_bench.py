"""Smoke test of `edgewatch bench --quick`: the report has every section and a well-formed table.

Timing is never asserted here (the bench itself compares numbers with goals); only the shape is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EDGEWATCH = str(Path(sys.executable).parent / "edgewatch")


@pytest.mark.timeout(180)
def test_bench_quick_writes_json_and_markdown(tmp_path: Path) -> None:
    js, md = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    proc = subprocess.run(
        [
            EDGEWATCH,
            "bench",
            "--quick",
            "--json",
            str(js),
            "--out",
            str(md),
            "--skab",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(js.read_text())
    assert rep["quick"] is True
    assert rep["machine"]["versions"]["onnxruntime"] != "not installed"
    # Every quick section produced rows (a failing section would be listed under "skipped" instead).
    assert not [s for s in rep["skipped"] if "failed" in s], rep["skipped"]
    assert {r["section"] for r in rep["rows"]} == {"model", "replay", "install", "live"}
    for r in rep["rows"]:
        assert r["figure"] and r["unit"]
        assert r["value"] is not None and math.isfinite(r["value"]) and r["value"] > 0, r
        if r["ref_value"] is not None and r["ratio"] is not None:
            assert (
                r["ratio"] == pytest.approx(r["value"] / r["ref_value"], rel=1e-6) or r["section"] == "model"
            )
    figures = " ".join(r["figure"] for r in rep["rows"])
    for needle in (
        "p99",
        "batch 32",
        "batch 256",
        "replay end to end",
        "MQTT ingest",
        "RSS",
        "CPU",
        "batch payloads of 10",
        "install",
    ):
        assert needle in figures, needle
    # Slow rows are skipped in --quick, with the reason stated.
    assert any("SKAB" in s for s in rep["skipped"]) and any("latency" in s for s in rep["skipped"])
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert "| section | figure | value |" in text and "Machine:" in text and "Versions:" in text
    assert text.count("\n| ") - 1 == len(rep["rows"])  # header separator excluded; one line per row


def _windows_both_ways(readings: list) -> tuple[list, list]:  # type: ignore[type-arg]
    """Windows from the Windower as shipped, and from one forced through agent.resample every time."""
    from agent.resample import resample_to_grid
    from agent.window import Windower

    fast = Windower(["a", "b"], window=16, stride=4, period=1.0, max_gap=3.0)
    slow = Windower(["a", "b"], window=16, stride=4, period=1.0, max_gap=3.0)
    slow._grid_ok = False  # no on-grid shortcut of either kind: every window is resampled
    slow._on_grid = lambda st: resample_to_grid(  # type: ignore[method-assign]
        np.fromiter(st.ts, dtype=np.float64), np.array(st.rows, dtype=np.float64), 1.0, 3.0
    )
    out_fast = [w for r in readings for w in fast.push(r)]
    out_slow = [w for r in readings for w in slow.push(r)]
    return out_fast, out_slow


CASES = ["on_grid", "jitter", "gaps_and_missing", "runs", "holes", "offset_nan", "dense_sparse"]


@pytest.mark.parametrize("case", CASES)
def test_windower_fast_path_cuts_the_same_windows_as_resampling(case: str) -> None:
    """The bench's windower speed-ups (skip interpolation when samples sit on the grid; keep the
    newest run's grid values, each point interpolated once, on or off the grid) change nothing."""
    from agent.types import Reading

    rng = np.random.default_rng(CASES.index(case) + 1)
    t0 = 1_764_806_400.0
    readings = []
    t, hole = t0, 0.0
    for i in range(600):
        t += 1.0
        if case == "jitter":
            t = round(t0 + i + 1 + rng.uniform(-0.3, 0.3), 3)
        if case == "runs":  # on-grid runs of 80 after stretches of 40 jittered samples
            t = t0 + i + 1 + (round(rng.uniform(-0.3, 0.3), 3) if (i // 40) % 3 == 1 else 0.0)
        if case == "runs" and i % 53 == 9:
            t += 0.001 if i % 2 else 0.0  # one sample just off the grid inside a run
        if case == "holes" and rng.random() < 0.08:
            t += float(rng.choice([1.0, 2.0]))  # SKAB-like: one or two missing seconds, bridged
        if case == "gaps_and_missing" and i % 97 == 50:
            t += float(rng.choice([2.0, 7.0]))  # one bridged, one breaking gap
        if case == "offset_nan":  # a device clock 0.437 s off the grid, holes of 1-2 s
            hole += float(rng.choice([1.0, 2.0])) if rng.random() < 0.08 else 0.0
            t = round(t0 + i + 1 + 0.437 + hole, 3)
        if case == "dense_sparse":  # 0.4 s apart, then 2.5 s apart (every point interpolated)
            t = readings[-1].ts + (0.4 if (i // 50) % 2 == 0 else 2.5) if readings else t0 + 0.25
            t = round(t, 3)
        values = {"a": float(rng.normal()), "b": float(rng.normal())}
        if case == "offset_nan" and i % 61 == 5:
            values["a"] = math.nan  # a NaN ends the run; the resampler bridges channel a around it
        if case in ("gaps_and_missing", "runs") and i % 41 == 7:
            del values["b"]  # a channel that did not arrive
        readings.append(Reading(device="d1", ts=t, values=values))
    fast, slow = _windows_both_ways(readings)
    assert len(fast) == len(slow) > 20
    for a, b in zip(fast, slow, strict=True):
        assert (a.device, a.start_ts, a.end_ts) == (b.device, b.start_ts, b.end_ts)
        assert np.array_equal(a.data, b.data)


class _EveryTick:
    """A pipeline without `tick_due`: replay then calls tick at every tick time, as before the skip."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        if name == "tick_due":
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.mark.timeout(60)
def test_replay_skipping_idle_ticks_changes_no_event(tmp_path: Path) -> None:
    """Replay skips ticks that cannot emit (a day-long gap); the events must be exactly the same."""
    from agent.bundle import load_bundle
    from agent.db import open_db
    from agent.pipeline import StageSettings, build_pipeline
    from agent.recording import Recording
    from agent.replay import replay

    bundle = load_bundle(Path(__file__).resolve().parents[1] / "models" / "default")
    rng = np.random.default_rng(0)
    t0 = 1_764_806_400.0

    def rec(device: str, ts: np.ndarray) -> Recording:
        vals = np.column_stack(
            [
                35 + rng.normal(0, 1, ts.size),
                1.5 + rng.normal(0, 0.1, ts.size),
                3.3 + rng.normal(0, 0.1, ts.size),
            ]
        )
        return Recording(device, ["temperature", "vibration", "pressure"], ts, vals)

    a = np.concatenate([t0 + np.arange(300.0), t0 + 86_400 + np.arange(300.0)])  # a day-long gap
    b = t0 + np.arange(120.0)  # goes silent for good after two minutes
    recs = [rec("pump-a", a), rec("pump-b", b)]
    results = []
    for i, wrap in enumerate((lambda p: p, _EveryTick)):
        db = open_db(tmp_path / f"r{i}.db")

        def factory(emit: object, on_judgement: object, db: object = db, wrap: object = wrap) -> object:
            return wrap(build_pipeline(StageSettings(), bundle, db, emit, on_judgement=on_judgement))  # type: ignore[operator,arg-type]

        results.append(replay(recs, factory))
        db.conn.close()
    skipped, every = results
    silent = [e for e in every.events if e.payload.get("kind") == "silent"]
    assert silent, "the recording must make health events for the comparison to mean anything"
    assert [e.payload for e in skipped.events] == [e.payload for e in every.events]
    assert [(j.score.end_ts, j.score.error) for j in skipped.judgements] == [
        (j.score.end_ts, j.score.error) for j in every.judgements
    ]


@pytest.mark.timeout(60)
def test_bench_only_runs_the_named_sections(tmp_path: Path) -> None:
    js = tmp_path / "bench.json"
    proc = subprocess.run(
        [EDGEWATCH, "bench", "--only", "install", "--json", str(js)],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(js.read_text())
    assert {r["section"] for r in rep["rows"]} == {"install"} and not rep["skipped"]
    bad = subprocess.run([EDGEWATCH, "bench", "--only", "install,nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr
    # --out would replace the whole report with a few rows: refused.
    out = subprocess.run(
        [EDGEWATCH, "bench", "--only", "install", "--out", str(tmp_path / "b.md")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and not (tmp_path / "b.md").exists()


def test_iter_readings_sort_equals_the_merge_of_the_files() -> None:
    """The numpy sort in `iter_readings` yields what a heap merge of the recordings yields: same
    readings, same order, ties broken by recording order; an unsorted recording keeps its file order."""
    from agent.recording import Recording, _merged_in_file_order, iter_readings

    rng = np.random.default_rng(5)

    def rec(device: str, ts: list[float], arrived: bool = False) -> Recording:
        vals = rng.normal(size=(len(ts), 2))
        vals[::7, 1] = np.nan
        mask = np.arange(len(ts)) % 5 != 3 if arrived else None  # rows 3, 8, ... never arrived
        return Recording(device, ["a", "b"], np.array(ts), vals, arrived=mask)

    grid = [float(t) for t in range(100)]
    recs = [rec("d1", grid), rec("d2", grid[::2], arrived=True), rec("d3", [t + 0.5 for t in grid])]
    picks = [np.arange(len(r)) if r.arrived is None else np.flatnonzero(r.arrived) for r in recs]
    fast, heap = list(iter_readings(recs)), list(_merged_in_file_order(recs, picks))
    assert len(fast) == len(heap) > 200
    assert [repr(r) for r in fast] == [repr(r) for r in heap]  # repr: NaN != NaN in a dict compare
    assert [r.device for r in fast if r.ts == 2.0] == ["d1", "d2"]  # a tie: recording order
    assert not [r for r in fast if r.device == "d2" and r.ts == 6.0]  # its row 3 did not arrive
    unsorted = [rec("d1", [3.0, 1.0, 2.0])]
    assert [r.ts for r in iter_readings(unsorted)] == [3.0, 1.0, 2.0]
