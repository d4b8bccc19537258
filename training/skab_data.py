"""Read the SKAB benchmark's CSV files (waico/SKAB, GPL-3.0: read from a path, never copied into the repo).

SKAB files are `;`-separated with one header row, mixed LF/CRLF line endings, a naive local `datetime`
column and eight sensor columns; 34 files carry `anomaly`/`changepoint` labels and `anomaly-free.csv`
has none. The header spells the flow sensor `Volume Flow RateRMS` (with spaces), unlike the README.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.recording import SKAB_CHANNELS

SENSORS: tuple[str, ...] = tuple(SKAB_CHANNELS)  # one list of SKAB's sensor columns, in file order
LABELS: tuple[str, ...] = ("anomaly", "changepoint")
# Folders of the labelled part, in the order results are reported; `anomaly-free/` is not scored.
LABELLED_FOLDERS: tuple[str, ...] = ("valve1", "valve2", "other")


class SkabFormatError(ValueError):
    """A file that does not follow SKAB's format; the message names the file, row and column."""


@dataclass(slots=True)
class SkabFile:
    """One SKAB recording: timestamps (s), sensor matrix in SENSORS order, labels (None if unlabelled)."""

    name: str  # e.g. "valve1/3"
    ts: np.ndarray  # float64 [n], seconds since the epoch of the naive local timestamps
    values: np.ndarray  # float64 [n, 8]
    anomaly: np.ndarray | None  # int8 [n]
    changepoint: np.ndarray | None  # int8 [n]

    @property
    def folder(self) -> str:
        return self.name.split("/", 1)[0]


def _parse_float(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SkabFormatError(f"{where}: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise SkabFormatError(f"{where}: not a finite number: {text!r}")
    return value


def read_skab_csv(path: str | Path, name: str | None = None) -> SkabFile:
    """Parse one SKAB CSV (LF or CRLF). Unlabelled files (no label columns) get `anomaly=None`."""
    path = Path(path)
    name = name or f"{path.parent.name}/{path.stem}"
    with path.open(newline="", encoding="utf-8") as fh:  # newline="" lets csv accept \n and \r\n
        rows = list(csv.reader(fh, delimiter=";"))
    if not rows:
        raise SkabFormatError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    if not header or header[0] != "datetime":
        raise SkabFormatError(f"{path}: first column must be 'datetime', got {header[:1]}")
    missing = [c for c in SENSORS if c not in header]
    if missing:
        raise SkabFormatError(f"{path}: missing sensor column(s) {missing}; header is {header}")
    present_labels = [c for c in LABELS if c in header]
    if present_labels and len(present_labels) != len(LABELS):
        raise SkabFormatError(f"{path}: has {present_labels} but SKAB files carry both {list(LABELS)}")
    body = [r for r in rows[1:] if r and any(cell.strip() for cell in r)]
    if not body:
        raise SkabFormatError(f"{path}: no data rows")
    col = {c: header.index(c) for c in (*SENSORS, *present_labels)}
    stamps: list[str] = []
    values = np.empty((len(body), len(SENSORS)), dtype=np.float64)
    labels = np.zeros((len(body), len(LABELS)), dtype=np.int8)
    for i, row in enumerate(body):
        line = i + 2
        if len(row) != len(header):
            raise SkabFormatError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
        stamps.append(row[0].strip())
        for j, c in enumerate(SENSORS):
            values[i, j] = _parse_float(row[col[c]], f"{path}:{line} column {c!r}")
        for j, c in enumerate(present_labels):
            v = _parse_float(row[col[c]], f"{path}:{line} column {c!r}")
            if v not in (0.0, 1.0):
                raise SkabFormatError(f"{path}:{line} column {c!r}: label must be 0 or 1, got {v}")
            labels[i, j] = int(v)
    try:
        ts = np.array(stamps, dtype="datetime64[s]").astype(np.int64).astype(np.float64)
    except ValueError as exc:
        raise SkabFormatError(f"{path}: bad datetime ({exc}); expected 'YYYY-MM-DD hh:mm:ss'") from None
    if np.any(np.diff(ts) <= 0):
        bad = int(np.argmax(np.diff(ts) <= 0)) + 3
        raise SkabFormatError(f"{path}:{bad}: timestamps must strictly increase")
    if present_labels:
        return SkabFile(name, ts, values, labels[:, 0].copy(), labels[:, 1].copy())
    return SkabFile(name, ts, values, None, None)


def _file_key(p: Path) -> tuple[int, str]:
    return (int(p.stem), p.stem) if p.stem.isdigit() else (10**9, p.stem)


def load_skab(data_dir: str | Path) -> list[SkabFile]:
    """The labelled files (valve1/, valve2/, other/, numeric order); each folder must exist."""
    data_dir = Path(data_dir)
    out: list[SkabFile] = []
    for folder in LABELLED_FOLDERS:
        d = data_dir / folder
        if not d.is_dir():
            raise SkabFormatError(f"{data_dir}: missing folder {folder}/ (expected SKAB's data/ layout)")
        for p in sorted(d.glob("*.csv"), key=_file_key):
            f = read_skab_csv(p, f"{folder}/{p.stem}")
            if f.anomaly is None:
                raise SkabFormatError(f"{p}: labelled folder {folder}/ holds a file without labels")
            out.append(f)
    if not out:
        raise SkabFormatError(f"{data_dir}: no CSV files in {', '.join(LABELLED_FOLDERS)}")
    return out
