"""Soak: the kill -9 harness of test_reliability_crash.py with >= 50 kills (`make soak`; not in the suite)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import Broker
from test_reliability_crash import run_kill_harness

KILLS = int(os.environ.get("EDGEWATCH_SOAK_KILLS", "50"))


@pytest.mark.timeout(1800)
def test_soak_sigkill_many_times(broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    result = run_kill_harness(broker, tmp_path, procs, kills=KILLS, seed=1234)
    print(result)
    assert result["kills"] >= 50 or "EDGEWATCH_SOAK_KILLS" in os.environ
