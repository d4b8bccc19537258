"""report.md and PNG plots for a bundle (matplotlib Agg, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

if TYPE_CHECKING:
    from training.pipeline import BuildResult

PLOTS = "plots"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def plot_loss(path: Path, train: list[float], val: list[float], best_epoch: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ep = np.arange(1, len(train) + 1)
    ax.plot(ep, train, label="train")
    ax.plot(ep, val, label="validation")
    ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch {best_epoch}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (scaled units)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_hist(path: Path, groups: dict[str, np.ndarray], thresholds: dict[str, float]) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    vals = [v for v in groups.values() if v.size]
    if vals:
        lo = max(min(float(np.min(v)) for v in vals), 1e-6)
        hi = max(float(np.max(v)) for v in vals) * 1.01
        bins = np.logspace(np.log10(lo), np.log10(max(hi, lo * 1.1)), 60)
        for name, v in groups.items():
            if v.size:
                ax.hist(v, bins=bins, alpha=0.55, density=True, label=f"{name} (n={v.size})")
    for name, t in thresholds.items():
        ax.axvline(t, ls="--", lw=1, color="k" if name == "p99" else "grey", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")  # the tail above the thresholds is what matters; linear density hides it
    ax.set_xlabel("window reconstruction error")
    ax.set_ylabel("density (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_pr(path: Path, labels: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Window-level precision-recall curves; returns AUC-ROC and average precision per detector."""
    out: dict[str, dict[str, float]] = {}
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, s in scores.items():
        p, r, _ = precision_recall_curve(labels, s)
        ap = float(average_precision_score(labels, s))
        out[name] = {"auc_roc": float(roc_auc_score(labels, s)), "average_precision": ap}
        ax.plot(r, p, label=f"{name} (AP {ap:.3f})")
    ax.axhline(float(np.mean(labels)), color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("recall (windows)")
    ax.set_ylabel("precision (windows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return out


def write_training_report(root: Path, res: BuildResult) -> dict[str, Any]:
    """report.md + plots for a training run; returns figures for the caller."""
    from training.baseline import fit_iforest

    m = res.manifest
    prep = res.prepared
    plots = root / PLOTS
    plots.mkdir(exist_ok=True)
    plot_loss(plots / "loss.png", res.history.train_loss, res.history.val_loss, res.history.best_epoch)
    q = m.calibration.quantiles
    groups = {"validation normal": res.cal_errors}
    figures: dict[str, Any] = {}
    have_faults = prep.heldout_labelled and prep.heldout_fault.any() and (~prep.heldout_fault).any()
    if have_faults:
        groups["held-out fault windows"] = res.heldout_errors[prep.heldout_fault]
        c = np.asarray(m.scaler.center, dtype=np.float32)
        s = np.asarray(m.scaler.scale, dtype=np.float32)
        scores = {"LSTM-AE int8": res.heldout_errors}
        for kind in ("stats", "flat"):
            base = fit_iforest((prep.train_x - c) / s, kind, seed=m.training.get("seed", 0))
            scores[f"IsolationForest ({kind})"] = base.score((prep.heldout_x - c) / s)
        figures["window_detection"] = plot_pr(plots / "pr.png", prep.heldout_fault, scores)
    plot_hist(plots / "errors.png", groups, {"p99": q["p99"], "p99.9": q["p99.9"]})

    lines = [
        "# edgewatch model report",
        "",
        f"- channels: {', '.join(f'{c.name} [{c.unit}]' for c in m.channels)}",
        f"- window {m.window} x {m.sample_period_s} s, stride {m.stride}, gaps up to {m.max_gap_s} s interpolated",
        f"- architecture: {m.architecture}",
        f"- data: {len(m.training_data.files)} file(s), {m.training_data.train_windows} training / "
        f"{m.training_data.val_windows} validation windows; normal rows: {m.training_data.selection}",
        f"- training: {m.training.get('epochs_run')} epochs ({m.training.get('train_seconds')} s), best validation "
        f"loss {_fmt(m.training.get('best_val_loss'))} at epoch {m.training.get('best_epoch')}",
        f"- int8 model {m.training.get('model_bytes_int8')} bytes (fp32 {m.training.get('model_bytes_fp32')})",
        "",
        "## Calibration (int8, validation normal windows)",
        "",
        "| " + " | ".join(q) + " |",
        "|" + "---|" * len(q),
        "| " + " | ".join(_fmt(v) for v in q.values()) + " |",
        "",
    ]
    if m.parity is not None:
        p = m.parity
        lines += [
            "## int8 vs fp32 parity",
            "",
            f"Gate set: {p.n_windows} windows ({p.n_injected} with injected spikes/shifts/noise). "
            f"Spearman {p.spearman:.5f} (gate >= 0.999), decisions at fp32 p99 agree on "
            f"{100 * p.decision_agreement:.2f} % (gate >= 99.5 %). Normal windows alone: Spearman "
            f"{_fmt(p.spearman_normal_only)}, agreement {_fmt(p.decision_agreement_normal_only)}.",
            "",
        ]
    lines += ["## Plots", "", f"![loss]({PLOTS}/loss.png)", f"![errors]({PLOTS}/errors.png)"]
    if have_faults:
        lines += [
            f"![precision-recall]({PLOTS}/pr.png)",
            "",
            "## Window-level detection on the held-out (last) part of the training files",
            "",
            "| detector | AUC-ROC | average precision |",
            "|---|---|---|",
            *(
                f"| {k} | {v['auc_roc']:.4f} | {v['average_precision']:.4f} |"
                for k, v in figures["window_detection"].items()
            ),
        ]
    (root / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return figures
