"""Replay reports: metrics against ground truth (when the recording has labels) and per-device plots.

Metrics are point-wise and event-wise (agent.evaluate), never point-adjusted. A row counts as
"alerted" while an alert of its device is open: from the window end that opened it to the window end
that resolved it (or the end of the recording).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import Bundle
from agent.evaluate import Evaluation, evaluate
from agent.recording import Recording, iso_utc
from agent.replay import ReplayResult


def alerted_rows(rec: Recording, spans: list[tuple[str, float, float | None, float]]) -> np.ndarray:
    pred = np.zeros(len(rec), dtype=bool)
    for _, opened, resolved, _ in spans:
        end = resolved if resolved is not None else np.inf
        pred |= (rec.ts >= opened) & (rec.ts <= end)
    return pred


def evaluate_replay(result: ReplayResult) -> tuple[Evaluation | None, dict[str, Evaluation]]:
    """Evaluation per device and merged, over recordings that carry labels."""
    spans = result.alert_spans()
    per_device: dict[str, Evaluation] = {}
    total: Evaluation | None = None
    for rec in result.recordings:
        truth = rec.anomalous()
        if truth is None:
            continue
        failure = rec.labels["machine_state"] == "failed" if "machine_state" in rec.labels else None
        ev = evaluate(truth, alerted_rows(rec, spans.get(rec.device, [])), rec.ts, failure)
        per_device[rec.device] = ev
        total = ev if total is None else total.merge(ev)
    return total, per_device


def _plot(rec: Recording, result: ReplayResult, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    js = [j for j in result.judgements if j.score.device == rec.device]
    n = len(rec.channels)
    fig, axes = plt.subplots(n + 1, 1, figsize=(12, 1.8 * (n + 1)), sharex=True)
    t0 = rec.ts[0]
    hours = (rec.ts - t0) / 3600
    truth = rec.anomalous()
    spans = result.alert_spans().get(rec.device, [])
    for k, ax in enumerate(axes):
        if truth is not None and truth.any():
            ax.fill_between(
                hours,
                0,
                1,
                where=truth,
                transform=ax.get_xaxis_transform(),
                color="tab:red",
                alpha=0.12,
                linewidth=0,
                label="labelled fault" if k == 0 else None,
            )
        for _, opened, resolved, _ in spans:
            end = resolved if resolved is not None else rec.ts[-1]
            ax.axvspan(
                (opened - t0) / 3600,
                (end - t0) / 3600,
                color="tab:orange",
                alpha=0.25,
                label="alert" if k == 0 else None,
            )
    for k, ch in enumerate(rec.channels):
        axes[k].plot(hours, rec.values[:, k], lw=0.6)
        axes[k].set_ylabel(ch, fontsize=8)
    if js:
        t = (np.array([j.score.end_ts for j in js]) - t0) / 3600
        axes[-1].plot(t, [j.score.error for j in js], lw=0.7, label="score")
        axes[-1].plot(t, [j.threshold for j in js], lw=0.9, color="k", ls="--", label="threshold")
        axes[-1].set_yscale("log")
    axes[-1].set_ylabel("error", fontsize=8)
    axes[-1].set_xlabel("hours since start")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"{rec.device} ({Path(rec.source).name})", fontsize=10)
    fig.tight_layout()
    path = out / f"{rec.device}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_replay_report(result: ReplayResult, out: Path, bundle: Bundle) -> Path:
    """report.md + metrics.json + one PNG per device; returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    total, per_device = evaluate_replay(result)
    lines = [
        "# Replay report",
        "",
        f"- model: `{bundle.model_id}`",
        f"- inputs: {', '.join(sorted({Path(r.source).name for r in result.recordings}))}",
        f"- readings: {result.readings}, windows scored: {len(result.judgements)}, "
        f"replay time {result.seconds:.1f} s",
        "",
        "## Alerts",
        "",
        "| device | alert id | opened (UTC) | duration | peak |",
        "|---|---|---|---|---|",
    ]
    for device, items in sorted(result.alert_spans().items()):
        for alert_id, opened, resolved, peak in items:
            dur = "open at end" if resolved is None else f"{resolved - opened:.0f} s"
            lines.append(f"| {device} | `{alert_id}` | {iso_utc(opened)} | {dur} | {peak:.3g} |")
    metrics: dict[str, Any] = {}
    if total is not None:
        metrics = {"total": total.to_dict(), "devices": {d: e.to_dict() for d, e in per_device.items()}}
        p, ev = total.point, total.event
        lines += [
            "",
            "## Against the labels",
            "",
            "Point-wise (every row while an alert is open counts as flagged) and event-wise (an event is",
            "found when an alert overlaps it). No point adjustment.",
            "",
            "| precision | recall | F1 | FAR % | MAR % | events found | false alerts | median time to detect | median lead time before failure |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {p.precision:.3f} | {p.recall:.3f} | {p.f1:.3f} | {100 * p.far:.2f} | {100 * p.mar:.2f} | "
            f"{ev.n_detected}/{ev.n_events} | {ev.n_false_alerts} | {ev.median_time_to_detect:.0f} s | "
            f"{ev.median_lead_time:.0f} s |",
        ]
    plots = [p for rec in result.recordings if (p := _plot(rec, result, out)) is not None]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    elif result.recordings:
        lines += ["", "(plots need matplotlib: `pip install 'edgewatch[train]'`)"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
