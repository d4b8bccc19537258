"""End to end on a tiny model: `edgewatch train` -> verified int8 bundle -> Scorer; the gates refuse."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from agent.bundle import MANIFEST_NAME, load_bundle
from agent.cli import main
from agent.score import Scorer
from training import export
from training.data import all_window_starts, cut_windows, read_file, to_grid
from training.export import ExportError, export_fp32, lstm_ops, quantize_int8
from training.model import LSTMAutoencoder
from training.synth import write_synth_csv

TINY = ["--window", "32", "--stride", "4", "--hidden", "16", "--epochs", "8", "--max-train-windows", "1024"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synth_csv(
        tmp_path_factory.mktemp("d") / "synth.csv", seconds=3600, devices=2, seed=1, fault_at=0.6
    )


@pytest.fixture(scope="module")
def bundle_dir(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("b") / "tiny"
    assert main(["train", str(data), "--out", str(out), *TINY]) == 0
    return out


def test_cli_writes_a_bundle_that_verifies(bundle_dir: Path, data: Path) -> None:
    b = load_bundle(bundle_dir)
    m = b.manifest
    assert m.channel_names == ["temperature", "vibration", "pressure"]
    assert (m.window, m.stride, m.sample_period_s, m.max_gap_s) == (32, 4, 1.0, 5.0)
    assert m.training_data.files[0].name == "synth.csv"
    assert m.training_data.files[0].sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
    assert {"model.onnx", "model.fp32.onnx", "report.md", "plots/loss.png", "plots/errors.png"} <= set(
        m.files
    )
    assert (bundle_dir / "model.onnx").stat().st_size < 200_000
    q = m.calibration.quantiles
    assert 0 < q["p50"] <= q["p99"] <= q["p99.9"]
    assert m.training["epochs_run"] >= 1 and m.training["best_val_loss"] < 1.0  # learnt something
    # the training distribution for the drift check: quantiles of the training data, in its units
    from agent.recording import read_recording

    assert m.input_stats is not None and m.input_stats.levels[0] == 0 and m.input_stats.levels[-1] == 100
    vals = np.concatenate([r.values for r in read_recording(data)])
    for j, q in enumerate(m.input_stats.quantiles):
        col = vals[:, j][np.isfinite(vals[:, j])]
        assert col.min() - 1e-3 <= q[0] <= q[len(q) // 2] <= q[-1] <= col.max() + 1e-3
        # the median of the windows used is near the median of the file (not 0: NaN was ignored)
        assert abs(q[len(q) // 2] - np.median(col)) <= 0.25 * (col.max() - col.min())
    assert (
        "Held-out" in (bundle_dir / "report.md").read_text()
        or "parity" in (bundle_dir / "report.md").read_text()
    )


def test_int8_graph_holds_dynamic_quantize_lstm(bundle_dir: Path) -> None:
    ops = lstm_ops(bundle_dir / "model.onnx")
    assert ops == {"DynamicQuantizeLSTM": 2}
    assert lstm_ops(bundle_dir / "model.fp32.onnx") == {"LSTM": 2}


def test_int8_fp32_parity_holds(bundle_dir: Path) -> None:
    p = load_bundle(bundle_dir).manifest.parity
    assert p is not None
    assert p.spearman >= 0.999 and p.decision_agreement >= 0.995
    assert p.n_windows >= 100 and p.n_injected == p.n_windows // 2


def test_fault_windows_score_higher_than_normal(bundle_dir: Path, data: Path) -> None:
    scorer = Scorer(load_bundle(bundle_dir))
    series, _ = read_file(data)
    pump1 = next(s for s in series if s.device == "pump-01")
    g = to_grid(pump1, 1.0, 5.0)
    starts = all_window_starts(g, scorer.window, scorer.stride)
    errors = scorer.errors(cut_windows(g.values, starts, scorer.window))[0]
    idx = starts[:, None] + np.arange(scorer.window)
    fault = (g.fault[idx] != "").all(axis=1)
    normal = (g.fault[idx] == "").all(axis=1)
    late = fault & (g.state[idx[:, 0]] == "failed")  # fully developed fault
    p99 = scorer.bundle.manifest.calibration.quantiles["p99"]
    assert np.median(errors[late]) > 10 * np.median(errors[normal])
    assert np.mean(errors[late] > p99) > 0.9
    assert np.mean(errors[normal] > p99) < 0.05


def test_quantization_gate_refuses_unquantized_lstms(tmp_path: Path) -> None:
    model = LSTMAutoencoder(3, 8, 1)
    export_fp32(model, 16, 3, tmp_path / "fp32.onnx")
    with pytest.raises(ExportError, match=r"expected 4 DynamicQuantizeLSTM.*refusing"):
        quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", expected_lstms=4)
    assert not (tmp_path / "int8.onnx").exists()


def test_parity_gate_failure_writes_no_model(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(export, "MIN_SPEARMAN", 1.01)  # impossible: the gate must refuse
    out = tmp_path / "refused"
    args = ["train", str(data), "--out", str(out), *TINY[:-4], "--epochs", "1", "--max-train-windows", "128"]
    assert main([*args, "--no-report"]) == 3
    err = capsys.readouterr().err
    assert "MODEL REFUSED" in err and "PARITY GATE FAILED" in err and "Spearman" in err
    assert not (out / "model.onnx").exists()
    assert not (out / MANIFEST_NAME).exists()


def test_bad_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    assert main(["train", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "unknown CSV layout" in capsys.readouterr().err


def test_manifest_is_valid_json_with_hashes(bundle_dir: Path) -> None:
    data = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    assert all(len(h) == 64 for h in data["files"].values())
    assert data["format_version"] == 1


def test_training_is_reproducible(data: Path, tmp_path: Path) -> None:
    args = ["--window", "32", "--stride", "4", "--hidden", "8", "--epochs", "2", "--max-train-windows", "256"]
    for name in ("a", "b"):
        assert main(["train", str(data), "--out", str(tmp_path / name), *args, "--no-report"]) == 0
    a, b = (load_bundle(tmp_path / n).manifest for n in ("a", "b"))
    assert a.files["model.fp32.onnx"] == b.files["model.fp32.onnx"]
    assert a.files["model.onnx"] == b.files["model.onnx"]
    assert a.calibration == b.calibration
