"""Read recordings (simulator CSV, agent export, SKAB CSV) and cut them into model windows.

Data flows: file -> `Series` per device (raw samples, NaN = missing) -> `GridSeries` (even grid via
`agent.resample`, the same code the live windower uses) -> windows inside NaN-free runs. Missing values
are never turned into 0: gaps up to `max_gap_s` are interpolated, longer ones break windows.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.resample import resample_to_grid, valid_runs, window_starts

SIM_CHANNELS: tuple[str, ...] = ("temperature", "vibration", "pressure")
SIM_LABELS: tuple[str, ...] = ("machine_state", "fault", "sensor_fault")
UNITS: dict[str, str] = {
    "temperature": "degC",
    "vibration": "mm/s",
    "pressure": "bar",
    "Accelerometer1RMS": "g",
    "Accelerometer2RMS": "g",
    "Current": "A",
    "Pressure": "bar",
    "Temperature": "degC",
    "Thermocouple": "degC",
    "Voltage": "V",
    "Volume Flow RateRMS": "l/min",
}
SKAB_LABELS: tuple[str, ...] = ("anomaly", "changepoint")


class DataError(ValueError):
    """Input that cannot be used; the message names the file, row and column."""


@dataclass(slots=True)
class Series:
    """One device's raw samples from one file, in time order."""

    source: str  # file name
    device: str
    ts: np.ndarray  # float64 [n] seconds since the epoch, UTC
    values: np.ndarray  # float64 [n, channels], NaN = missing
    channels: list[str]
    labelled: bool  # ground truth present (simulator, SKAB)
    state: np.ndarray  # object [n]: machine_state ("normal", "degrading", "failed", "" unknown)
    fault: np.ndarray  # object [n]: machine fault name, "" none (SKAB: "anomaly")
    sensor_fault: np.ndarray  # object [n]: sensor fault name, "" none

    @property
    def normal(self) -> np.ndarray:
        """Rows known to be normal (labelled data) or assumed normal (no labels)."""
        if not self.labelled:
            return np.ones(self.ts.size, dtype=bool)
        return (self.state == "normal") & (self.fault == "") & (self.sensor_fault == "")


@dataclass(slots=True)
class GridSeries:
    """A Series on the even grid, with labels carried to each grid point."""

    source: str
    device: str
    ts: np.ndarray  # float64 [m]
    values: np.ndarray  # float64 [m, channels], NaN = break
    normal: np.ndarray  # bool [m]
    fault: np.ndarray  # object [m] machine fault ("" none)
    state: np.ndarray  # object [m]
    sensor_fault: np.ndarray  # object [m]
    labelled: bool


@dataclass(slots=True)
class FileInfo:
    name: str
    sha256: str
    rows: int


def _num(text: str) -> float:
    """Cell -> float; empty and 'nan' are missing (NaN), never 0."""
    t = text.strip()
    if not t or t.lower() == "nan":
        return np.nan
    return float(t)


def _iso_to_seconds(col: list[str], where: str) -> np.ndarray:
    try:
        stamps = np.array([s.strip().rstrip("Z") for s in col], dtype="datetime64[ms]")
    except ValueError as e:
        raise DataError(f"{where}: bad timestamp: {e}") from e
    return stamps.astype(np.int64).astype(np.float64) / 1000.0


def _read_text(path: Path) -> tuple[str, str]:
    """File text and the sha256 of its bytes."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    try:
        return raw.decode("utf-8-sig"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from e


def detect_format(header: list[str]) -> str:
    """'sim' (simulator CSV / agent export) or 'skab' from a header row."""
    if "datetime" in header:
        return "skab"
    if header[:2] == ["ts", "device"]:
        return "sim"
    raise DataError(f"unknown CSV layout (header {header[:6]}...): expected simulator/export or SKAB")


def read_file(path: str | Path, channels: list[str] | None = None) -> tuple[list[Series], FileInfo]:
    """Read one CSV into per-device Series of the chosen channels (default: all known ones)."""
    p = Path(path)
    text, digest = _read_text(p)
    first = text.split("\n", 1)[0]
    delim = ";" if first.count(";") > first.count(",") else ","
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delim))
    rows = [r for r in rows if r and r != [""]]
    if not rows:
        raise DataError(f"{p}: empty file")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    fmt = detect_format(header)
    nh = len(header)
    bad = next((i for i, r in enumerate(body) if len(r) != nh), None)
    if bad is not None:
        raise DataError(f"{p}:{bad + 2}: {len(body[bad])} fields, header has {nh}")
    info = FileInfo(name=p.name, sha256=digest, rows=len(body))
    known = [h for h in header if h in UNITS] if fmt == "skab" else [h for h in header if h in SIM_CHANNELS]
    chans = list(channels) if channels else known
    missing = [c for c in chans if c not in header]
    if missing:
        raise DataError(f"{p}: channels {missing} not in header {header}")
    if not chans:
        raise DataError(f"{p}: no known channel columns in header {header}; pass --channels")
    cols = dict(zip(header, (list(c) for c in zip(*body, strict=True)), strict=True)) if body else {}
    cols = {h: cols.get(h, []) for h in header}
    values = np.empty((len(body), len(chans)), dtype=np.float64)
    for j, c in enumerate(chans):
        values[:, j] = _numeric_column(cols[c], f"{p}: column {c!r}")
    n = len(body)
    if fmt == "skab":
        ts = _iso_to_seconds([s.replace(" ", "T") for s in cols["datetime"]], str(p))
        labelled = "anomaly" in cols
        anomaly = _numeric_column(cols["anomaly"], f"{p}: anomaly") if labelled else np.zeros(n)
        fault = np.where(anomaly > 0, "anomaly", "").astype(object)
        state = np.where(anomaly > 0, "degrading", "normal").astype(object)
        devices = np.full(n, p.stem, dtype=object)
        sensor_fault = np.full(n, "", dtype=object)
    else:
        ts = _iso_to_seconds(cols["ts"], str(p))
        devices = np.array(cols["device"], dtype=object)
        labelled = all(h in cols for h in SIM_LABELS) and any(
            s.strip() for s in cols.get("machine_state", [])
        )
        state = np.array([s.strip() for s in cols.get("machine_state", [""] * n)], dtype=object)
        fault = np.array([s.strip() for s in cols.get("fault", [""] * n)], dtype=object)
        sensor_fault = np.array([s.strip() for s in cols.get("sensor_fault", [""] * n)], dtype=object)
    out: list[Series] = []
    for dev in dict.fromkeys(devices.tolist()):
        idx = np.flatnonzero(devices == dev)
        order = idx[np.argsort(ts[idx], kind="stable")]
        out.append(
            Series(
                source=p.name,
                device=str(dev),
                ts=ts[order],
                values=values[order],
                channels=chans,
                labelled=bool(labelled),
                state=state[order],
                fault=fault[order],
                sensor_fault=sensor_fault[order],
            )
        )
    return out, info


def _numeric_column(col: list[str], where: str) -> np.ndarray:
    """Vectorised cell parsing: empty and 'nan' become NaN (missing), anything else must be a number."""
    arr = np.asarray(col, dtype=str)
    arr = np.where(np.char.str_len(arr) == 0, "nan", arr)
    try:
        return arr.astype(np.float64)
    except ValueError:
        for i, v in enumerate(col):
            try:
                _num(v)
            except ValueError:
                raise DataError(f"{where}, row {i + 2}: not a number: {v!r}") from None
        raise


def infer_period(series: list[Series]) -> float:
    """Median sample spacing over all series, rounded to ms."""
    diffs = np.concatenate([np.diff(s.ts) for s in series if s.ts.size > 1] or [np.array([1.0])])
    diffs = diffs[diffs > 0]
    return float(np.round(np.median(diffs), 3)) if diffs.size else 1.0


def to_grid(s: Series, period: float, max_gap: float) -> GridSeries:
    """Resample onto the grid; a grid point is normal only if the samples on both sides are."""
    g, v = resample_to_grid(s.ts, s.values, period, max_gap)
    n = s.ts.size
    left = np.clip(np.searchsorted(s.ts, g, side="right") - 1, 0, max(n - 1, 0))
    right = np.clip(left + 1, 0, max(n - 1, 0))
    normal = s.normal
    return GridSeries(
        source=s.source,
        device=s.device,
        ts=g,
        values=v,
        normal=normal[left] & normal[right],
        fault=s.fault[left],
        state=s.state[left],
        sensor_fault=s.sensor_fault[left],
        labelled=s.labelled,
    )


def apply_normal_until(g: GridSeries, normal_until: float | None) -> None:
    """Unlabelled data: only rows before `normal_until` (epoch seconds) count as normal."""
    if normal_until is not None:
        g.normal = g.normal & (g.ts < normal_until)


def cut_windows(values: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """[len(starts), window, channels] float32 copies."""
    if starts.size == 0:
        return np.empty((0, window, values.shape[1]), dtype=np.float32)
    idx = starts[:, None] + np.arange(window)[None, :]
    return values[idx].astype(np.float32)


def normal_window_starts(
    g: GridSeries, window: int, stride: int, lo: int = 0, hi: int | None = None
) -> np.ndarray:
    """Window starts within rows [lo, hi) whose every row is NaN-free and normal."""
    hi = g.ts.size if hi is None else hi
    ok = np.all(np.isfinite(g.values[lo:hi]), axis=1) & g.normal[lo:hi]
    runs = valid_runs(np.where(ok, 0.0, np.nan))
    return window_starts(runs, window, stride) + lo


def all_window_starts(g: GridSeries, window: int, stride: int) -> np.ndarray:
    """Every NaN-free window start (for scoring/evaluation)."""
    return window_starts(valid_runs(g.values), window, stride)


def time_split(g: GridSeries, val_fraction: float) -> int:
    """Row index where validation starts: the last `val_fraction` of the device's time range."""
    if g.ts.size == 0:
        return 0
    cut = g.ts[0] + (1.0 - val_fraction) * (g.ts[-1] - g.ts[0])
    return int(np.searchsorted(g.ts, cut, side="left"))
