"""SKAB's published scoring protocol, re-implemented from its description (README + core/metrics.py).

Point-wise TP/FP/FN/TN are summed over all files (micro-average). Changepoint detection is scored
with SKAB's NAB variant: for every true changepoint t a scoring window [t, t + 60 s] ("righter"),
overlaps resolved by moving the later window's start to the earlier window's end ("cut right
window"); the first predicted changepoint inside a window is a TP weighted by a scaled tanh of its
position (full A_tp at the window start, A_fp at its end); every other predicted changepoint outside
all windows is an FP; an empty window is an FN. Scores are summed over files and normalised as
100 * (S - S_null) / (S_perfect - S_null).

Two rules turn per-window decisions into row labels:
- `leaderboard_rows`: the notebooks' loop (looks ahead; cannot flag the first T-1 and last 2(T-1) rows);
- streaming: each row takes the decision of the window ending at it (what a live agent knows), so the
  caller's per-row decisions are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN_ROWS = 400  # train_test_split(train_size=400, shuffle=False) per file
NAB_WINDOW_S = 60.0
# (A_tp, A_fp, A_fn) per profile, as in SKAB's table_of_coef.
NAB_PROFILES: dict[str, tuple[float, float, float]] = {
    "standard": (1.0, -0.11, -1.0),
    "lowfp": (1.0, -0.22, -1.0),
    "lowfn": (1.0, -0.11, -2.0),
}
_NAB_DETAIL = 1000  # resolution of the scaled tanh, as upstream


@dataclass(slots=True)
class Counts:
    """Point-wise confusion counts; add them across files for the micro-average."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> Counts:
    """Point-wise counts of one file; both arrays are 0/1 of the same length."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    if t.shape != p.shape:
        raise ValueError(f"labels {t.shape} and predictions {p.shape} differ in shape")
    return Counts(int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p)), int(np.sum(~t & ~p)))


def binary_scores(c: Counts) -> dict[str, float]:
    """F1 = TP/(TP+(FP+FN)/2), FAR = FP/(FP+TN)*100, MAR = FN/(FN+TP)*100 (unrounded; NaN if undefined)."""
    nan = float("nan")
    f1 = c.tp / (c.tp + (c.fp + c.fn) / 2) if c.tp + c.fp + c.fn else nan
    far = 100.0 * c.fp / (c.fp + c.tn) if c.fp + c.tn else nan
    mar = 100.0 * c.fn / (c.fn + c.tp) if c.fn + c.tp else nan
    return {"f1": f1, "far": far, "mar": mar}


def leaderboard_rows(window_flags: np.ndarray, window: int) -> np.ndarray:
    """The notebooks' loop: window j covers test rows j..j+T-1; row i is flagged when windows
    i-T+1 .. i-1 (T-1 of them, a half-open slice) are all flagged, for i in [T-1, n_windows-T+1).

    Returns 0/1 labels for the n = n_windows + T - 1 test rows.
    """
    w = np.asarray(window_flags).astype(bool)
    n_rows = len(w) + window - 1
    out = np.zeros(n_rows, dtype=np.int8)
    lo, hi = window - 1, len(w) - window + 1
    if hi <= lo:
        return out
    # count of flagged windows in w[i-T+1 : i] via a prefix sum; an empty slice counts as "all".
    csum = np.concatenate([[0], np.cumsum(w, dtype=np.int64)])
    idx = np.arange(lo, hi)
    flagged = csum[idx] - csum[idx - window + 1]
    out[idx] = (flagged == window - 1).astype(np.int8)
    return out


def window_flags_from_stream(row_flags: np.ndarray, window: int) -> np.ndarray:
    """Decisions of the windows lying wholly in the test part, from per-row decisions of the window
    ending at each row: window j (rows j..j+T-1) is the decision at row j+T-1."""
    return np.asarray(row_flags)[window - 1 :]


def predicted_changepoints(rows: np.ndarray) -> np.ndarray:
    """SKAB's changepoint prediction: |diff| of the 0/1 row labels, the first row keeping its label."""
    r = np.asarray(rows).astype(np.int8)
    cp = np.zeros_like(r)
    if len(r):
        cp[0] = r[0]
        cp[1:] = np.abs(np.diff(r))
    return cp


def rolling_max_changepoints(rows: np.ndarray, span: int = 30) -> np.ndarray:
    """The Isolation-Forest notebook's CP rule: rolling(span).max().fillna(0).diff().abs() (first row
    dropped as NaN, so it is never a changepoint)."""
    r = np.asarray(rows).astype(np.int8)
    mx = np.zeros(len(r), dtype=np.int8)
    if len(r) >= span:
        view = np.lib.stride_tricks.sliding_window_view(r, span)
        mx[span - 1 :] = view.max(axis=1)
    cp = np.zeros_like(r)
    cp[1:] = np.abs(np.diff(mx))
    return cp


def nab_windows(ts: np.ndarray, true_cp: np.ndarray, width_s: float = NAB_WINDOW_S) -> list[list[float]]:
    """Scoring windows [t, t+width] to the right of each true changepoint, cut-right on overlap."""
    starts = np.asarray(ts, dtype=np.float64)[np.asarray(true_cp).astype(bool)]
    wins = [[float(t), float(t) + width_s] for t in starts]
    for i in range(len(wins) - 1):
        if wins[i][1] >= wins[i + 1][0]:
            wins[i + 1][0] = wins[i][1]
    return wins


@dataclass(slots=True)
class NabFile:
    """NAB raw material of one file: TP positions (0 = window start, 1 = end), FP and FN counts."""

    tp_positions: list[float]
    n_fp: int
    n_fn: int
    n_windows: int
    delays_s: list[float]


def nab_file(
    ts: np.ndarray, true_cp: np.ndarray, pred_cp: np.ndarray, width_s: float = NAB_WINDOW_S
) -> NabFile:
    """Match predicted changepoints of one file to its scoring windows (first detection counts)."""
    ts = np.asarray(ts, dtype=np.float64)
    t_pred = ts[np.asarray(pred_cp).astype(bool)]
    wins = nab_windows(ts, true_cp, width_s)
    if not wins:
        return NabFile([], len(t_pred), 0, 0, [])
    outside = t_pred < wins[0][0]
    tp_pos: list[float] = []
    delays: list[float] = []
    n_fn = 0
    for i, (a, b) in enumerate(wins):
        inside = t_pred[(t_pred >= a) & (t_pred <= b)]
        if len(inside) == 0:
            n_fn += 1
        else:
            tp_pos.append((inside[0] - a) / (b - a) if b > a else 0.0)
            delays.append(float(inside[0] - a))
        upper = wins[i + 1][0] if i + 1 < len(wins) else np.inf
        outside |= (t_pred > b) & (t_pred < upper)
    return NabFile(tp_pos, int(np.sum(outside)), n_fn, len(wins), delays)


def _scaled_tp(position: float, a_tp: float, a_fp: float) -> float:
    """SKAB's "improved" scale: a tanh falling from A_tp at the window start to A_fp at its end."""
    x = np.linspace(-np.pi / 2, np.pi / 2, _NAB_DETAIL)
    event = min(int(position * _NAB_DETAIL), _NAB_DETAIL - 1)
    half = (a_tp - a_fp) / 2
    return float(half * -np.tanh(x[event]) / np.tanh(np.pi / 2) + half + a_fp)


def nab_scores(files: list[NabFile]) -> dict[str, float]:
    """Normalised NAB (standard, lowfp, lowfn) over all files, plus missed-CP and FP counts."""
    out: dict[str, float] = {}
    for profile, (a_tp, a_fp, a_fn) in NAB_PROFILES.items():
        s = s_null = s_perfect = 0.0
        for f in files:
            s += a_fp * f.n_fp + a_fn * f.n_fn + sum(_scaled_tp(p, a_tp, a_fp) for p in f.tp_positions)
            s_null += a_fn * f.n_windows
            s_perfect += a_tp * f.n_windows
        out[f"nab_{profile}"] = 100.0 * (s - s_null) / (s_perfect - s_null) if s_perfect != s_null else 0.0
    out["missed_cps"] = float(sum(f.n_fn for f in files))
    out["fp_cps"] = float(sum(f.n_fp for f in files))
    delays = [d for f in files for d in f.delays_s]
    out["median_delay_s"] = float(np.median(delays)) if delays else float("nan")
    return out
