"""SKAB benchmark: parsing (generated files in SKAB's format), the protocol's metrics against hand-worked
examples, and a tiny end-to-end `edgewatch eval skab` on a generated SKAB-format directory.

No SKAB data is used here (GPL-3.0): every file is generated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from training.skab_data import SENSORS, SkabFormatError, load_skab, read_skab_csv
from training.skab_metrics import (
    Counts,
    binary_scores,
    confusion,
    leaderboard_rows,
    nab_file,
    nab_scores,
    nab_windows,
    predicted_changepoints,
    rolling_max_changepoints,
    window_flags_from_stream,
)

HEADER = ["datetime", *SENSORS]
BASE = np.array([0.027, 0.040, 1.1, 0.38, 71.2, 25.08, 220.0, 32.0])
NOISE = np.array([0.0005, 0.0005, 0.05, 0.05, 0.05, 0.005, 2.0, 0.5])


def write_skab_csv(
    path: Path,
    n: int = 800,
    anomaly: tuple[int, int] | None = (550, 700),
    eol: str = "\r\n",
    labelled: bool = True,
    seed: int = 0,
    shift: float = 8.0,
) -> np.ndarray:
    """Write a SKAB-format file (`;`, one header, 1-2 s steps); return the sensor matrix written.

    During the anomaly, flow drops and vibration rises by `shift` noise sds (like a closed valve).
    """
    rng = np.random.default_rng(seed)
    x = BASE + rng.normal(size=(n, len(SENSORS))) * NOISE
    lab = np.zeros(n)
    cp = np.zeros(n)
    if anomaly is not None:
        a, b = anomaly
        x[a:b, 7] -= shift * NOISE[7]
        x[a:b, 0] += shift * NOISE[0]
        lab[a:b] = 1
        cp[a] = 1
        if b < n:
            cp[b] = 1
    t0 = np.datetime64("2020-03-09T10:14:33")
    steps = np.cumsum(np.where(rng.random(n) < 0.05, 2, 1)) - 1
    header = HEADER + (["anomaly", "changepoint"] if labelled else [])
    lines = [";".join(header)]
    for i in range(n):
        ts = str(t0 + np.timedelta64(int(steps[i]), "s")).replace("T", " ")
        cells = [ts, *(f"{v:.6g}" for v in x[i])]
        if labelled:
            cells += [f"{lab[i]:.1f}", f"{cp[i]:.1f}"]
        lines.append(";".join(cells))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((eol.join(lines) + eol).encode())
    return x


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_read_both_line_endings(tmp_path: Path, eol: str) -> None:
    p = tmp_path / "valve1" / "0.csv"
    x = write_skab_csv(p, n=50, anomaly=(20, 30), eol=eol)
    assert (b"\r\n" in p.read_bytes()) == (eol == "\r\n")
    f = read_skab_csv(p)
    assert f.name == "valve1/0"
    assert f.values.shape == (50, 8)
    np.testing.assert_allclose(f.values, x, rtol=1e-5)
    assert f.anomaly is not None and f.changepoint is not None
    assert f.anomaly.sum() == 10 and f.anomaly[20] == 1 and f.anomaly[30] == 0
    assert list(np.flatnonzero(f.changepoint)) == [20, 30]
    assert np.all(np.diff(f.ts) >= 1)


def test_flow_column_is_read_by_its_real_name(tmp_path: Path) -> None:
    """The header says `Volume Flow RateRMS` (with spaces); the column must land in the flow slot."""
    p = tmp_path / "other" / "1.csv"
    x = write_skab_csv(p, n=30, anomaly=None)
    f = read_skab_csv(p)
    flow = SENSORS.index("Volume Flow RateRMS")
    np.testing.assert_allclose(f.values[:, flow], x[:, 7], rtol=1e-5)
    # the README's spelling is not accepted silently
    q = tmp_path / "bad.csv"
    q.write_text(p.read_text().replace("Volume Flow RateRMS", "RateRMS"))
    with pytest.raises(SkabFormatError, match="Volume Flow RateRMS"):
        read_skab_csv(q)


def test_unlabelled_anomaly_free_file(tmp_path: Path) -> None:
    p = tmp_path / "anomaly-free" / "anomaly-free.csv"
    write_skab_csv(p, n=40, anomaly=None, labelled=False)
    f = read_skab_csv(p)
    assert f.anomaly is None and f.changepoint is None
    assert f.values.shape == (40, 8)


def test_bad_input_is_named(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    write_skab_csv(p, n=10, anomaly=None)
    lines = p.read_text().splitlines()
    lines[4] = lines[4].replace(lines[4].split(";")[3], "nan", 1)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(SkabFormatError, match=r"x\.csv:5 column 'Current'"):
        read_skab_csv(p)


def test_load_skab_orders_files_and_skips_anomaly_free(tmp_path: Path) -> None:
    for folder, names in (("valve1", [0, 2, 10]), ("valve2", [0]), ("other", [1])):
        for i in names:
            write_skab_csv(tmp_path / folder / f"{i}.csv", n=20, anomaly=(5, 10), eol="\n" if i else "\r\n")
    write_skab_csv(tmp_path / "anomaly-free" / "anomaly-free.csv", n=20, anomaly=None, labelled=False)
    files = load_skab(tmp_path)
    assert [f.name for f in files] == ["valve1/0", "valve1/2", "valve1/10", "valve2/0", "other/1"]
    (tmp_path / "valve2" / "0.csv").unlink()
    (tmp_path / "valve2").rmdir()
    with pytest.raises(SkabFormatError, match="valve2"):
        load_skab(tmp_path)


# ---------------------------------------------------------------------------------------------- metrics


def test_binary_scores_hand_worked() -> None:
    c = confusion(np.array([1, 1, 1, 0, 0, 0]), np.array([1, 1, 0, 1, 0, 0]))
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    s = binary_scores(c)
    assert s["f1"] == pytest.approx(2 / 3)  # TP / (TP + (FP+FN)/2) = 2 / 3
    assert s["far"] == pytest.approx(100 / 3)
    assert s["mar"] == pytest.approx(100 / 3)
    # micro-average: counts add up before the ratio
    total = c + Counts(tp=0, fp=0, fn=3, tn=0)
    assert binary_scores(total)["f1"] == pytest.approx(2 / (2 + (1 + 4) / 2))


def test_leaderboard_rule_hand_worked() -> None:
    # T = 3: row i in [2, 6) is flagged when windows i-2 and i-1 are both flagged
    w = np.array([1, 1, 0, 1, 1, 1, 1, 1])
    assert leaderboard_rows(w, 3).tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 0, 0]
    # a constant alarm cannot flag the first T-1 or the last 2(T-1) rows
    rows = leaderboard_rows(np.ones(20 - 4 + 1), 4)
    assert len(rows) == 20
    assert rows.tolist() == [0] * 3 + [1] * 11 + [0] * 6


def test_streaming_rule_maps_rows_to_windows() -> None:
    row_flags = np.array([0, 0, 1, 1, 0, 1])
    # window j covers rows j..j+T-1 and takes the decision at its last row
    assert window_flags_from_stream(row_flags, 3).tolist() == [1, 1, 0, 1]


def test_changepoint_predictions() -> None:
    assert predicted_changepoints(np.array([1, 1, 0, 0, 1])).tolist() == [1, 0, 1, 0, 1]
    rows = np.array([0, 0, 1, 0, 0, 0, 0])
    # rolling(3).max() = [nan, nan, 1, 1, 1, 0, 0] -> fillna(0) -> |diff| (first row NaN, dropped)
    assert rolling_max_changepoints(rows, 3).tolist() == [0, 0, 1, 0, 0, 1, 0]


def test_nab_windows_cut_right_on_overlap() -> None:
    ts = np.arange(200.0)
    cp = np.zeros(200)
    cp[[10, 40]] = 1
    assert nab_windows(ts, cp, 60.0) == [[10.0, 70.0], [70.0, 100.0]]


def test_nab_hand_worked() -> None:
    ts = np.arange(200.0)
    true_cp = np.zeros(200)
    true_cp[[10, 100]] = 1  # windows [10, 70] and [100, 160]
    pred = np.zeros(200)
    pred[[5, 10, 12, 80]] = 1  # 5: FP (left); 10: TP at the window start; 12: ignored; 80: FP (between)
    f = nab_file(ts, true_cp, pred)
    assert (f.n_fp, f.n_fn, f.n_windows, f.tp_positions) == (2, 1, 2, [0.0])
    s = nab_scores([f])
    # Standard: S = 1 - 0.11*2 - 1 = -0.22; null = -2; perfect = 2 -> 100 * 1.78 / 4
    assert s["nab_standard"] == pytest.approx(44.5)
    assert s["nab_lowfp"] == pytest.approx(100 * (1 - 0.44 - 1 + 2) / 4)  # 39.0
    assert s["nab_lowfn"] == pytest.approx(100 * (1 - 0.22 - 2 + 4) / 6)  # 46.33
    assert (s["missed_cps"], s["fp_cps"]) == (1, 2)


def test_nab_late_detection_earns_the_fp_weight() -> None:
    """A detection at the window's right edge scores A_fp (scaled tanh end), an early one A_tp."""
    ts = np.arange(100.0)
    true_cp = np.zeros(100)
    true_cp[10] = 1
    late = np.zeros(100)
    late[70] = 1
    early = np.zeros(100)
    early[10] = 1
    # S_late = A_fp = -0.11 -> 100 * (-0.11 + 1) / 2
    assert nab_scores([nab_file(ts, true_cp, late)])["nab_standard"] == pytest.approx(44.5)
    assert nab_scores([nab_file(ts, true_cp, early)])["nab_standard"] == pytest.approx(100.0)
    assert nab_scores([nab_file(ts, true_cp, np.zeros(100))])["nab_standard"] == pytest.approx(0.0)


def test_decision_stage_hand_worked() -> None:
    """The agent's threshold and alert stages, as the benchmark drives them, on a hand-worked series."""
    from training.skab import DecisionConfig, decide, fixed_threshold

    assert fixed_threshold(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 0.5, 2.0) == pytest.approx(4.0)
    cfg = DecisionConfig(
        ewma_alpha=1.0,
        threshold_quantile=0.5,
        threshold_margin=2.0,
        open_k=2,
        open_n=3,
        recovery_ratio=0.5,
        resolve_m=2,
    )
    # 4 training windows at 0.5 -> threshold 2 x 0.5 = 1.0; then: opens on the 2nd of 3 above 1.0,
    # 0.8 keeps it open (hysteresis), two scores under 0.5 resolve it
    raw = np.array([0.5] * 4 + [2.0, 0.0, 2.0, 0.8, 0.4, 0.4, 0.4])
    state, thr = decide(raw, 4, cfg)
    assert thr == pytest.approx(1.0)
    assert state.tolist() == [0] * 4 + [0, 0, 1, 1, 1, 0, 0]
    # smoothing: alpha 0.5 halves a single spike (2.0 after 0.5 -> 1.25 > 1 opens with k = n = 1)...
    one = DecisionConfig(ewma_alpha=0.5, threshold_quantile=0.5, threshold_margin=2.0)
    assert decide(np.array([0.5] * 4 + [2.0, 0.5, 0.5]), 4, one)[0].tolist() == [0] * 4 + [1, 0, 0]
    # ... and a spike of 1.4 stays under the threshold once smoothed (0.95), where alpha 1 alerts on it
    assert decide(np.array([0.5] * 4 + [1.4, 0.5]), 4, one)[0].sum() == 0
    raw_cfg = one.model_copy(update={"ewma_alpha": 1.0})
    assert decide(np.array([0.5] * 4 + [1.4, 0.5]), 4, raw_cfg)[0].tolist() == [0] * 4 + [1, 0]


def test_latent_t2_hand_worked() -> None:
    from agent.score import latent_t2
    from training.export import fit_latent_t2

    ref = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # mean 0, cov diag(2/3, 2/3)
    spec = fit_latent_t2(ref, ridge=0.0)
    t2 = latent_t2(np.array([[1.0, 1.0], [0.0, 0.0]]), np.array(spec.mean), np.array(spec.inv_cov))
    assert t2 == pytest.approx([3.0, 0.0])
    # the ridge adds ridge x mean variance to the diagonal: 1 / (2/3 + 2/3) per unit direction
    spec = fit_latent_t2(ref, ridge=1.0)
    assert latent_t2(np.array([[1.0, 1.0]]), np.array(spec.mean), np.array(spec.inv_cov)) == pytest.approx(
        [1.5]
    )


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.timeout(120)
def test_eval_skab_end_to_end(tmp_path: Path) -> None:
    from agent.cli import main

    data = tmp_path / "skab"
    for i, (folder, name) in enumerate((("valve1", "0"), ("valve2", "0"), ("other", "1"))):
        write_skab_csv(
            data / folder / f"{name}.csv", n=760, anomaly=(520, 680), seed=i, eol="\r\n" if i else "\n"
        )
    write_skab_csv(data / "anomaly-free" / "anomaly-free.csv", n=100, anomaly=None, labelled=False)
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "skab",
            "--data",
            str(data),
            "--out",
            str(out),
            "--seeds",
            "0",
            "--epochs",
            "2",
            "--window",
            "30",
            "--jobs",
            "1",
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for det in ("lstm_ae_int8", "isolation_forest", "constant_alarm"):
        for rule in ("streaming", "leaderboard"):
            row = m[det][rule]
            for key in ("f1", "far", "mar", "nab_standard", "nab_lowfp", "nab_lowfn"):
                assert math.isfinite(row[key]), (det, rule, key)
            assert 0 <= row["f1"] <= 1 and 0 <= row["far"] <= 100 and 0 <= row["mar"] <= 100
    # constant alarm under the streaming rule: every normal test row is a false alarm
    assert m["constant_alarm"]["streaming"]["far"] == pytest.approx(100.0)
    assert m["constant_alarm"]["streaming"]["mar"] == pytest.approx(0.0)
    # an 8-sd level shift is found by the product path, with few false alarms
    lstm = m["lstm_ae_int8"]["streaming"]
    assert lstm["f1"] > 0.7 and lstm["far"] < 30
    assert m["subsets"]["lstm_ae_int8"]["untuned"]["streaming"]["f1"]["mean"] > 0.5
    assert "SKAB benchmark" in (out / "report.md").read_text()
