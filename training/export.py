"""PyTorch -> ONNX fp32 -> int8 (dynamic quantization), with the checks that make the result safe.

Two gates, both refusing to produce `model.onnx` when they fail:
- every LSTM must have become `com.microsoft::DynamicQuantizeLSTM` (a known trap leaves LSTMs fp32
  with no error when `quant_pre_process` is skipped);
- int8 and fp32 must rank held-out windows the same way (Spearman >= 0.999) and agree on the alert
  decision at the calibrated p99 on >= 99.5 % of windows.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from scipy.stats import spearmanr

from agent.bundle import Parity

log = logging.getLogger(__name__)

MIN_SPEARMAN = 0.999
MIN_DECISION_AGREEMENT = 0.995


class ExportError(RuntimeError):
    """The exported or quantized model must not be shipped."""


@dataclass(slots=True)
class ParityResult:
    parity: Parity
    passed: bool
    reasons: list[str]


def export_fp32(model: torch.nn.Module, window: int, n_channels: int, path: Path) -> None:
    """Legacy exporter (opset 17): one native LSTM node per layer, batch axis dynamic, 0.1 s."""
    model.eval()
    dummy = torch.zeros(2, window, n_channels, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # tracer chatter about LSTM size checks and batch size: the graph has no h0/c0 inputs, so the
        # dynamic batch axis is safe (tests run batch 1 and larger batches through onnxruntime)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["recon"],
            dynamic_axes={"x": {0: "batch"}, "recon": {0: "batch"}},
        )


def lstm_ops(path: Path) -> dict[str, int]:
    """Count LSTM-family nodes in an ONNX graph (`LSTM`, `DynamicQuantizeLSTM`)."""
    graph = onnx.load(str(path)).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if "LSTM" in node.op_type:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def quantize_int8(fp32_path: Path, int8_path: Path, expected_lstms: int) -> dict[str, int]:
    """`quant_pre_process` then `quantize_dynamic(QInt8)`; refuse unless every LSTM was quantized."""
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        quantize_dynamic(str(pre), str(int8_path), weight_type=QuantType.QInt8)
    ops = lstm_ops(int8_path)
    if ops.get("LSTM", 0) or ops.get("DynamicQuantizeLSTM", 0) != expected_lstms:
        int8_path.unlink(missing_ok=True)
        raise ExportError(
            f"int8 graph {int8_path.name}: expected {expected_lstms} DynamicQuantizeLSTM and no fp32 LSTM, "
            f"got {ops}; refusing the model"
        )
    return ops


def check_parity(
    errors_fp32: Callable[[np.ndarray], np.ndarray],
    errors_int8: Callable[[np.ndarray], np.ndarray],
    windows: np.ndarray,
    threshold: float,
) -> ParityResult:
    """Compare per-window errors of the two models on held-out windows (physical units)."""
    e32 = errors_fp32(windows)
    e8 = errors_int8(windows)
    rho = float(spearmanr(e32, e8).statistic)
    agree = float(np.mean((e32 > threshold) == (e8 > threshold)))
    rel = float(np.max(np.abs(e8 - e32) / np.maximum(e32, 1e-12)))
    parity = Parity(
        spearman=rho,
        decision_agreement=agree,
        max_rel_error_diff=rel,
        n_windows=len(e32),
        threshold=threshold,
    )
    reasons = []
    if not rho >= MIN_SPEARMAN:
        reasons.append(f"Spearman {rho:.5f} < {MIN_SPEARMAN}")
    if not agree >= MIN_DECISION_AGREEMENT:
        reasons.append(f"decision agreement {agree:.4f} < {MIN_DECISION_AGREEMENT}")
    return ParityResult(parity=parity, passed=not reasons, reasons=reasons)
