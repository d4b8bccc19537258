"""Recordings in, verified bundle out: data -> windows -> fit -> ONNX -> int8 -> gates -> calibration -> bundle.

Calibration uses the int8 model (what the gateway runs) and `agent.score.window_errors` (what the
gateway computes), on validation windows that training never saw. The bundle is written into `out`
with `manifest.json` last, so a failed run never leaves a loadable bundle behind.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from agent.bundle import (
    MANIFEST_NAME,
    MANIFEST_SHA_NAME,
    QUANTILE_KEYS,
    Calibration,
    ChannelSpec,
    DataFile,
    InputStats,
    Manifest,
    Parity,
    Scaler,
    TrainingData,
    finalize_bundle,
)
from agent.score import window_errors
from training.data import (
    UNITS,
    DataError,
    FileInfo,
    GridSeries,
    all_window_starts,
    apply_normal_until,
    cut_windows,
    infer_period,
    normal_window_starts,
    read_file,
    time_split,
    to_grid,
)
from training.export import ExportError, check_parity, export_fp32, quantize_int8
from training.model import LSTMAutoencoder, ModelConfig, count_parameters
from training.train import History, TrainConfig, fit, seed_everything

log = logging.getLogger(__name__)

QUANTILE_LEVELS = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.5": 99.5, "p99.9": 99.9}


class PipelineConfig(BaseModel):
    """Everything that decides what a training run produces."""

    model_config = ConfigDict(extra="forbid")
    channels: list[str] | None = Field(default=None, description="channels in model order (None: all known)")
    window: int = Field(default=64, ge=2, description="window length in samples")
    stride: int = Field(default=8, ge=1, description="samples between training window starts")
    period: float | None = Field(default=None, gt=0, description="grid period in s (None: median spacing)")
    max_gap_s: float | None = Field(
        default=None, ge=0, description="longest gap bridged by interpolation (None: 5 periods)"
    )
    val_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="last share of each device's time kept out"
    )
    normal_until: str | None = Field(
        default=None, description="ISO time; unlabelled rows before it are normal"
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="autoencoder shape")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimiser settings")
    parity_windows: int = Field(
        default=4000, ge=16, description="windows compared int8 vs fp32 (half held-out normal, half injected)"
    )
    report: bool = Field(default=True, description="write report.md and plots into the bundle")


@dataclass
class Prepared:
    """Windows and provenance for one run (physical units; scaling happens later)."""

    channels: list[str]
    period: float
    max_gap: float
    grids: list[GridSeries]
    files: list[FileInfo]
    train_x: np.ndarray
    val_x: np.ndarray
    heldout_x: np.ndarray  # every NaN-free validation-period window (faults included)
    heldout_fault: np.ndarray  # bool per heldout window: any machine-fault row (labelled data only)
    heldout_labelled: bool
    selection: str
    rows_used: int


@dataclass
class BuildResult:
    manifest: Manifest
    history: History
    prepared: Prepared
    cal_errors: np.ndarray  # int8 errors of validation (normal) windows
    heldout_errors: np.ndarray  # int8 errors of all held-out windows
    extras: dict[str, Any] = field(default_factory=dict)


def _parse_time(text: str) -> float:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise DataError(f"--normal-until {text!r}: give a timezone (e.g. 2026-12-01T06:00:00Z)")
    return dt.timestamp()


def prepare(paths: list[str | Path], cfg: PipelineConfig) -> Prepared:
    """Read files, put every device on the grid, split by time, cut normal windows."""
    series, files = [], []
    for p in paths:
        s, info = read_file(p, cfg.channels)
        series.extend(s)
        files.append(info)
    if not series:
        raise DataError("no data in the given files")
    channels = series[0].channels
    for s in series:
        if s.channels != channels:
            raise DataError(f"{s.source}: channels {s.channels} differ from {channels} in {series[0].source}")
    period = cfg.period or infer_period(series)
    max_gap = cfg.max_gap_s if cfg.max_gap_s is not None else 5.0 * period
    normal_until = _parse_time(cfg.normal_until) if cfg.normal_until else None
    labelled = all(s.labelled for s in series)
    if labelled:
        selection = "labelled rows: machine_state normal, no fault, no sensor_fault"
    elif normal_until is not None:
        selection = f"unlabelled rows before {cfg.normal_until}"
    else:
        selection = "all rows (no labels, no --normal-until): assumes the recording is healthy"
    grids = []
    tr, va, ho, hof = [], [], [], []
    rows_used = 0
    for s in series:
        g = to_grid(s, period, max_gap)
        if not s.labelled:
            apply_normal_until(g, normal_until)
        grids.append(g)
        split = time_split(g, cfg.val_fraction)
        # a gap of `window` rows between the parts, so no validation window overlaps a training one
        st = normal_window_starts(g, cfg.window, cfg.stride, 0, max(split - cfg.window, 0))
        sv = normal_window_starts(g, cfg.window, cfg.stride, split)
        tr.append(cut_windows(g.values, st, cfg.window))
        va.append(cut_windows(g.values, sv, cfg.window))
        sh = all_window_starts(g, cfg.window, cfg.stride)
        sh = sh[sh >= split]
        ho.append(cut_windows(g.values, sh, cfg.window))
        fault_row = (g.fault != "") | ((g.state != "normal") & (g.state != ""))
        hof.append(np.array([fault_row[a : a + cfg.window].any() for a in sh], dtype=bool))
        rows_used += int(g.normal.sum())
    train_x, val_x = np.concatenate(tr), np.concatenate(va)
    if train_x.shape[0] < 8 or val_x.shape[0] < 8:
        raise DataError(
            f"too little normal data: {train_x.shape[0]} training and {val_x.shape[0]} validation windows of "
            f"{cfg.window} x {period} s (need >= 8 each; gaps > {max_gap} s break windows)"
        )
    return Prepared(
        channels=channels,
        period=period,
        max_gap=max_gap,
        grids=grids,
        files=files,
        train_x=train_x,
        val_x=val_x,
        heldout_x=np.concatenate(ho),
        heldout_fault=np.concatenate(hof),
        heldout_labelled=labelled,
        selection=selection,
        rows_used=rows_used,
    )


def fit_scaler(train_x: np.ndarray) -> Scaler:
    """Mean/std per channel over all training rows; std floored so a flat channel cannot explode."""
    flat = train_x.reshape(-1, train_x.shape[-1]).astype(np.float64)
    center = flat.mean(axis=0)
    scale = np.maximum(flat.std(axis=0), 1e-3 * np.maximum(np.abs(center), 1.0))
    return Scaler(center=center.tolist(), scale=scale.tolist())


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def errors_with(sess: ort.InferenceSession, scaler: Scaler, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Window errors of physical-unit windows `x` through an ONNX session, as the gateway computes them."""
    c = np.asarray(scaler.center, dtype=np.float32)
    s = np.asarray(scaler.scale, dtype=np.float32)
    name = sess.get_inputs()[0].name
    tot, per = [], []
    for i in range(0, x.shape[0], 1024):
        xs = ((x[i : i + 1024] - c) / s).astype(np.float32)
        (rec,) = sess.run(None, {name: xs})[:1]
        t, p = window_errors(xs, rec)
        tot.append(t)
        per.append(p)
    if not tot:
        return np.empty(0), np.empty((0, x.shape[-1]))
    return np.concatenate(tot), np.concatenate(per)


INPUT_LEVELS = [float(v) for v in range(0, 101, 5)]


def input_stats(windows: np.ndarray) -> InputStats:
    """Each channel's training distribution (quantiles every 5 %) from physical-unit windows
    [n, window, channels], NaN ignored: what the agent's drift check compares recent inputs with."""
    flat = windows.reshape(-1, windows.shape[-1]).astype(np.float64)
    q = [np.nanpercentile(flat[:, j], INPUT_LEVELS).tolist() for j in range(flat.shape[1])]
    return InputStats(levels=INPUT_LEVELS, quantiles=q)


def calibrate(total: np.ndarray, per_channel: np.ndarray) -> Calibration:
    q = np.percentile(total, [QUANTILE_LEVELS[k] for k in QUANTILE_KEYS])
    q = np.maximum.accumulate(q)
    return Calibration(
        quantiles={k: float(v) for k, v in zip(QUANTILE_KEYS, q, strict=True)},
        channel_error_mean=per_channel.mean(axis=0).tolist(),
        channel_error_std=per_channel.std(axis=0).tolist(),
        n_windows=int(total.size),
    )


def _subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    if x.shape[0] <= n:
        return x
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=n, replace=False))
    return x[idx]


def build_bundle(paths: list[str | Path], out: str | Path, cfg: PipelineConfig) -> BuildResult:
    """Train and write a bundle into `out`; raises ExportError (and writes no model.onnx) if a gate fails."""
    t_start = time.perf_counter()
    prep = prepare(paths, cfg)
    log.info(
        "data: %d files, %d devices, %d train / %d validation windows, channels %s, period %.3f s",
        len(prep.files),
        len(prep.grids),
        prep.train_x.shape[0],
        prep.val_x.shape[0],
        prep.channels,
        prep.period,
    )
    scaler = fit_scaler(prep.train_x)
    c = np.asarray(scaler.center, dtype=np.float32)
    s = np.asarray(scaler.scale, dtype=np.float32)
    seed_everything(cfg.train.seed)
    model = LSTMAutoencoder(len(prep.channels), cfg.model.hidden, cfg.model.layers)
    history = fit(model, (prep.train_x - c) / s, (prep.val_x - c) / s, cfg.train)

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)  # from here on, the directory is not a valid bundle
    (root / MANIFEST_SHA_NAME).unlink(missing_ok=True)
    for stale in ("model.onnx", "model.fp32.onnx"):
        (root / stale).unlink(missing_ok=True)
    fp32 = root / "model.fp32.onnx"
    int8 = root / "model.onnx"
    export_fp32(model, cfg.window, len(prep.channels), fp32)
    s32 = session(fp32)
    threshold = float(np.percentile(errors_with(s32, scaler, prep.val_x)[0], 99.0))
    parity_x = _subsample(prep.val_x, cfg.parity_windows // 2, cfg.train.seed)
    candidates = []
    for reduce_range in (False, True):
        path = root / f"model.int8-rr{int(reduce_range)}.tmp"
        ops = quantize_int8(fp32, path, expected_lstms=2 * cfg.model.layers, reduce_range=reduce_range)
        s8 = session(path)
        result = check_parity(
            lambda x: errors_with(s32, scaler, x)[0],
            lambda x, s8=s8: errors_with(s8, scaler, x)[0],
            parity_x,
            np.asarray(scaler.scale),
            threshold,
            seed=cfg.train.seed,
        )
        log.info("int8 reduce_range=%s: %s", reduce_range, result.parity)
        candidates.append((result.passed, result.parity.spearman, reduce_range, path, ops, result))
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    _, _, reduce_range, best_path, ops, result = candidates[0]
    for other in candidates[1:]:
        other[3].unlink(missing_ok=True)
    if not result.passed:
        best_path.unlink(missing_ok=True)
        msg = f"PARITY GATE FAILED, no model.onnx written in {root}: {'; '.join(result.reasons)}"
        log.error(msg)
        raise ExportError(msg)
    best_path.replace(int8)
    s8 = session(int8)
    cal_total, cal_per = errors_with(s8, scaler, prep.val_x)
    calibration = calibrate(cal_total, cal_per)
    heldout_errors = errors_with(s8, scaler, prep.heldout_x)[0] if prep.heldout_x.size else np.empty(0)

    manifest = Manifest(
        channels=[ChannelSpec(name=ch, unit=UNITS.get(ch, "")) for ch in prep.channels],
        window=cfg.window,
        stride=cfg.stride,
        sample_period_s=prep.period,
        max_gap_s=prep.max_gap,
        scaler=scaler,
        calibration=calibration,
        input_stats=input_stats(np.concatenate([prep.train_x, prep.val_x])),
        architecture={
            "type": "lstm_autoencoder",
            "hidden": cfg.model.hidden,
            "layers": cfg.model.layers,
            "parameters": count_parameters(model),
            "int8_ops": ops,
            "quantization": {"weight_type": "QInt8", "reduce_range": reduce_range, "per_channel": False},
        },
        training_data=TrainingData(
            files=[DataFile(name=f.name, sha256=f.sha256, rows=f.rows) for f in prep.files],
            rows_used=prep.rows_used,
            train_windows=int(prep.train_x.shape[0]),
            val_windows=int(prep.val_x.shape[0]),
            selection=prep.selection,
        ),
        training={
            "epochs_run": len(history.val_loss),
            "best_epoch": history.best_epoch,
            "best_val_loss": history.best_val_loss,
            "final_train_loss": history.train_loss[-1],
            "stopped_early": history.stopped_early,
            "train_seconds": round(history.seconds, 2),
            "seed": cfg.train.seed,
            "lr": cfg.train.lr,
            "batch_size": cfg.train.batch_size,
            "model_bytes_int8": int8.stat().st_size,
            "model_bytes_fp32": fp32.stat().st_size,
        },
        parity=Parity.model_validate(result.parity.model_dump()),
    )
    res = BuildResult(
        manifest=manifest,
        history=history,
        prepared=prep,
        cal_errors=cal_total,
        heldout_errors=heldout_errors,
    )
    if cfg.report:
        from training.report import write_training_report

        res.extras.update(write_training_report(root, res))
    res.manifest.training["total_seconds"] = round(time.perf_counter() - t_start, 2)
    res.manifest = finalize_bundle(root, res.manifest)
    return res
