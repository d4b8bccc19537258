"""Smoke test of `edgewatch bench --quick`: the report has every section and a well-formed table.

Timing is never asserted here (the bench itself compares numbers with goals); only the shape is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

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
        "install",
    ):
        assert needle in figures, needle
    # Slow rows are skipped in --quick, with the reason stated.
    assert any("SKAB" in s for s in rep["skipped"]) and any("latency" in s for s in rep["skipped"])
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert "| section | figure | value |" in text and "Machine:" in text and "Versions:" in text
    assert text.count("\n| ") - 1 == len(rep["rows"])  # header separator excluded; one line per row
