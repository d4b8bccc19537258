"""Training data readers: simulator CSV, agent export, SKAB; gaps and NaN never become 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import (
    DataError,
    apply_normal_until,
    normal_window_starts,
    read_file,
    time_split,
    to_grid,
)

SKAB_HEADER = (
    "datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;Voltage;"
    "Volume Flow RateRMS;anomaly;changepoint"
)


def _skab_rows(n: int) -> list[str]:
    rows = []
    for i in range(n):
        anomaly = 1.0 if 6 <= i < 9 else 0.0
        rows.append(
            f"2020-03-09 10:14:{30 + i:02d};0.02{i};0.04{i};0.7;0.05{i};24.3;24.2;229.5;{32 + i}.0;{anomaly};0.0"
        )
    return rows


@pytest.mark.parametrize("eol", ["\r\n", "\n"])
def test_skab_file_parses_with_either_line_ending(tmp_path: Path, eol: str) -> None:
    p = tmp_path / "3.csv"
    p.write_bytes((eol.join([SKAB_HEADER, *_skab_rows(10)]) + eol).encode())
    (s,), info = read_file(p)
    assert info.rows == 10 and len(info.sha256) == 64
    assert s.device == "3" and s.labelled
    assert s.channels[-1] == "Volume Flow RateRMS" and len(s.channels) == 8
    np.testing.assert_array_equal(np.diff(s.ts), np.ones(9))
    np.testing.assert_allclose(s.values[:, s.channels.index("Volume Flow RateRMS")], np.arange(32, 42))
    np.testing.assert_array_equal(s.normal, [i < 6 or i >= 9 for i in range(10)])


def test_skab_channel_selection(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("\n".join([SKAB_HEADER, *_skab_rows(4)]) + "\n")
    (s,), _ = read_file(p, ["Volume Flow RateRMS", "Current"])
    assert s.channels == ["Volume Flow RateRMS", "Current"]
    np.testing.assert_allclose(s.values[:, 1], 0.7)
    with pytest.raises(DataError, match=r"channels \['Flow'\] not in header"):
        read_file(p, ["Flow"])


SIM = """ts,device,temperature,vibration,pressure,machine_state,fault,sensor_fault
2026-12-01T00:00:00.000Z,pump-01,40.00,2.000,3.000,normal,,
2026-12-01T00:00:00.000Z,pump-02,30.00,1.000,2.000,normal,,
2026-12-01T00:00:01.000Z,pump-01,nan,2.100,3.100,normal,,nan
2026-12-01T00:00:01.000Z,pump-02,,,,normal,,dropout
2026-12-01T00:00:02.000Z,pump-01,40.20,2.200,3.200,degrading,bearing_wear,
2026-12-01T00:00:02.000Z,pump-02,30.20,1.200,2.200,normal,,
"""


def test_sim_csv_missing_values_are_nan_never_zero(tmp_path: Path) -> None:
    p = tmp_path / "sim.csv"
    p.write_text(SIM)
    series, info = read_file(p)
    assert info.rows == 6 and [s.device for s in series] == ["pump-01", "pump-02"]
    a, b = series
    assert a.channels == ["temperature", "vibration", "pressure"]
    assert np.isnan(a.values[1, 0]) and a.values[1, 1] == 2.1
    assert np.all(np.isnan(b.values[1]))
    assert not np.any(a.values == 0) and not np.any(b.values == 0)
    np.testing.assert_array_equal(a.normal, [True, False, False])  # sensor fault, then machine fault
    g = to_grid(b, period=1.0, max_gap=2.0)
    np.testing.assert_allclose(g.values[1], [30.1, 1.1, 2.1])  # 2 s gap bridged
    g = to_grid(b, period=1.0, max_gap=1.5)
    assert np.all(np.isnan(g.values[1]))  # too long: a break, not 0


def test_agent_export_without_labels_and_normal_until(tmp_path: Path) -> None:
    lines = ["ts,device,temperature,vibration,pressure,machine_state,fault,sensor_fault"]
    lines += [f"2026-12-01T00:00:{i:02d}.000Z,gw-1,{40 + i * 0.1:.2f},2.0,3.0,,," for i in range(40)]
    p = tmp_path / "export.csv"
    p.write_text("\n".join(lines) + "\n")
    (s,), _ = read_file(p)
    assert not s.labelled and s.normal.all()
    g = to_grid(s, 1.0, 5.0)
    apply_normal_until(g, g.ts[0] + 20)
    assert g.normal.sum() == 20
    starts = normal_window_starts(g, window=8, stride=4)
    np.testing.assert_array_equal(starts, [0, 4, 8, 12])
    assert time_split(g, 0.25) == 30  # 29.25 s of 39 s -> first row at/after it


def test_bad_cells_and_layouts_are_refused_with_location(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(SIM.replace("2.100", "two"))
    with pytest.raises(DataError, match=r"bad\.csv: column 'vibration', row 4: not a number: 'two'"):
        read_file(p)
    p.write_text(SIM.replace("3.200,degrading", "3.200"))
    with pytest.raises(DataError, match=r"bad\.csv:6: 7 fields, header has 8"):
        read_file(p)
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="unknown CSV layout"):
        read_file(p)
