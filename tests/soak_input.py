"""Soak: >= 100,000 generated inputs (good readings and junk of every kind) at a running agent over MQTT;
it stays up and its Prometheus counters account for every one (`make soak`; not in the suite)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import Broker
from test_reliability_input import run_live_fuzz

INPUTS = int(os.environ.get("EDGEWATCH_SOAK_INPUTS", "100000"))


@pytest.mark.timeout(1800)
def test_soak_live_agent_counts_every_input(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    result = run_live_fuzz(broker, tmp_path, procs, n=INPUTS, seed=99)
    print(result)
    assert result["accepted"] + result["rejected"] == INPUTS
