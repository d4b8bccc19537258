"""`python -m training.default_model --out models/default`: the shipped model, reproducibly.

Records a fixed-seed healthy simulator day (3 pumps, 1 Hz) with `firmware_sim`, trains the bundle on
it, then evaluates the int8 bundle, loaded and verified exactly as the agent loads it, on held-out days
with other seeds: one in which every machine fault (and some sensor faults) occurs, one healthy.

Headline: the PRODUCT's decision path. Each held-out day is replayed through the agent's own pipeline
(`build_pipeline(StageSettings(), ...)`: rolling threshold + k-of-n alerts) and the alert spans are
scored against the labels (`training.product_eval`). The Isolation Forest baseline goes through the
same threshold and alert classes on the same windows. The older per-window rule (error > calibrated
quantile, each window alone) is kept as a secondary, window-level view. Results go into the bundle's
report.md and eval.json, and a summary into the manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.bundle import Bundle, finalize_bundle, load_bundle, sha256_file
from agent.pipeline import StageSettings
from agent.replay import load_inputs
from agent.score import Scorer
from agent.threshold import ThresholdConfig
from firmware_sim.record import DEFAULT_START, record
from firmware_sim.scenario import build_scenario
from training.baseline import IForestBaseline, fit_iforest
from training.heldout import ScoredGrid, evaluate_detector, load_grids, score_grids
from training.model import ModelConfig
from training.pipeline import BuildResult, PipelineConfig, build_bundle
from training.product_eval import decide, replay_product, rescore, summarise
from training.report import PLOTS, _fmt, plot_hist, plot_pr
from training.train import TrainConfig

log = logging.getLogger("training.default_model")

TRAIN_SEED = 101
EVAL_SEED = 202
HEALTHY_SEED = 707  # held-out healthy day: false alerts where there is nothing to find
# Tuning seeds (threshold/alert defaults were chosen on these, never on the two above): mixed 303,
# healthy 606, and single-fault recordings (docs/detection.md).
DEVICES = 3
DAY_S = 86400.0
# Headline rule fixed before looking at held-out results: the calibrated p99.9 (where the agent's
# threshold starts), every window judged alone. Other rules are shown as sensitivity only.
HEADLINE = ("p99.9", 1)
RULES = [("p99", 1), ("p99", 3), ("p99.9", 1), ("p99.9", 3)]


def default_config() -> PipelineConfig:
    return PipelineConfig(
        window=64,
        stride=8,
        period=1.0,
        max_gap_s=5.0,
        model=ModelConfig(hidden=32, layers=1),
        train=TrainConfig(
            epochs=30, patience=5, seed=0, max_train_windows=8192, progress=sys.stderr.isatty()
        ),
    )


def record_days(tmp: Path) -> tuple[Path, Path, Path]:
    start_ms = int(DEFAULT_START.timestamp() * 1000)
    train = tmp / f"sim-normal-seed{TRAIN_SEED}.csv"
    heldout = tmp / f"sim-mixed-seed{EVAL_SEED}.csv"
    healthy = tmp / f"sim-normal-seed{HEALTHY_SEED}.csv"
    record(
        train, TRAIN_SEED, DEVICES, build_scenario("normal", DEVICES, DAY_S, seed=TRAIN_SEED), start_ms, DAY_S
    )
    record(
        heldout,
        EVAL_SEED,
        DEVICES,
        build_scenario("mixed", DEVICES, DAY_S, seed=EVAL_SEED),
        start_ms + int(7 * DAY_S * 1000),
        DAY_S,
    )
    record(
        healthy,
        HEALTHY_SEED,
        DEVICES,
        build_scenario("normal", DEVICES, DAY_S, seed=HEALTHY_SEED),
        start_ms + int(8 * DAY_S * 1000),
        DAY_S,
    )
    return train, heldout, healthy


# Product-path variants shown beside the default (decided on tuning seeds; shown here for reference).
PRODUCT_VARIANTS: dict[str, ThresholdConfig] = {
    "rolling_percentile 1.5 x q99 (old default)": ThresholdConfig(kind="rolling_percentile"),
    "fixed calibrated p99.9": ThresholdConfig(kind="fixed"),
}


def _if_calibration(scores: np.ndarray) -> dict[str, float]:
    """An Isolation Forest's own quantiles on the validation (normal) windows, as the manifest has them."""
    qs = np.quantile(scores, [0.5, 0.9, 0.99, 0.995, 0.999])
    return dict(zip(["p50", "p90", "p99", "p99.5", "p99.9"], map(float, qs), strict=True))


def evaluate_product(
    bundle: Bundle, res: BuildResult, files: dict[str, Path], iforests: dict[str, IForestBaseline]
) -> dict[str, object]:
    """Every held-out file replayed through the product (StageSettings() defaults); the Isolation
    Forests and threshold variants through the same threshold + alert classes on the same windows."""
    m = bundle.manifest
    c = np.asarray(m.scaler.center, dtype=np.float32)
    s = np.asarray(m.scaler.scale, dtype=np.float32)
    val_scaled = (res.prepared.val_x - c) / s
    if_cal = {k: _if_calibration(f.score(val_scaled)) for k, f in iforests.items()}
    out: dict[str, object] = {}
    for label, path in files.items():
        recs = load_inputs([path], m.channel_names)
        cap = replay_product(bundle, recs, StageSettings(), keep_windows=True)
        scores = [j.score for j in cap.result.judgements]
        rows: dict[str, object] = {"lstm_ae": summarise(cap.result)}
        for name, tc in PRODUCT_VARIANTS.items():
            r = decide(scores, recs, m.calibration.quantiles, StageSettings(threshold=tc), bundle.model_id)
            rows[f"lstm_ae, {name}"] = summarise(r)
        x = (np.stack([w.data for w in cap.windows]) - c) / s
        for kind, f in iforests.items():
            sc = rescore(scores, f.score(x), f"iforest_{kind}")
            rows[f"iforest_{kind}"] = summarise(decide(sc, recs, if_cal[kind], StageSettings(), kind))
        out[label] = {"file": path.name, "sha256": sha256_file(path), "windows": len(scores), "rows": rows}
    return out


def fit_iforests(res: BuildResult, bundle: Bundle) -> dict[str, IForestBaseline]:
    c = np.asarray(bundle.manifest.scaler.center, dtype=np.float32)
    s = np.asarray(bundle.manifest.scaler.scale, dtype=np.float32)
    return {kind: fit_iforest((res.prepared.train_x - c) / s, kind, seed=0) for kind in ("stats", "flat")}


def evaluate_heldout(
    out: Path, res: BuildResult, heldout: Path, iforests: dict[str, IForestBaseline]
) -> dict[str, object]:
    """Secondary, window-level view: error > a calibrated quantile, each window (or k in a row) alone."""
    bundle = load_bundle(out)
    scorer = Scorer(bundle, threads=1)
    m = bundle.manifest
    grids = load_grids([heldout], m.channel_names, m.sample_period_s, m.max_gap_s)
    scored: list[ScoredGrid] = score_grids(grids, scorer)

    c = np.asarray(m.scaler.center, dtype=np.float32)
    s = np.asarray(m.scaler.scale, dtype=np.float32)
    prep = res.prepared
    from training.data import cut_windows

    for sg in scored:
        x = (cut_windows(sg.grid.values, sg.starts, m.window) - c) / s
        for kind, f in iforests.items():
            sg.scores[f"iforest_{kind}"] = f.score(x)
    val_scaled = (prep.val_x - c) / s
    val_scores = {
        "lstm_ae": res.cal_errors,
        **{f"iforest_{k}": f.score(val_scaled) for k, f in iforests.items()},
    }

    # window labels: any machine-fault row in the window; sensor-fault-only windows kept out of the PR view
    labels, normal_only, allscores = [], [], {k: [] for k in val_scores}
    for sg in scored:
        g = sg.grid
        idx = sg.starts[:, None] + np.arange(m.window)[None, :]
        fault = (g.fault[idx] != "").any(axis=1)
        sensor = (g.sensor_fault[idx] != "").any(axis=1)
        labels.append(fault)
        normal_only.append(~fault & ~sensor)
        for k in allscores:
            allscores[k].append(sg.scores[k])
    y = np.concatenate(labels)
    keep = y | np.concatenate(normal_only)
    sc = {k: np.concatenate(v) for k, v in allscores.items()}
    names = {
        "lstm_ae": "LSTM-AE int8",
        "iforest_stats": "IsolationForest (stats)",
        "iforest_flat": "IsolationForest (flat)",
    }
    window_auc = plot_pr(out / PLOTS / "heldout_pr.png", y[keep], {names[k]: v[keep] for k, v in sc.items()})
    plot_hist(
        out / PLOTS / "heldout_errors.png",
        {"normal windows": sc["lstm_ae"][~y & keep], "machine-fault windows": sc["lstm_ae"][y]},
        {"p99": m.calibration.quantiles["p99"], "p99.9": m.calibration.quantiles["p99.9"]},
    )

    results: dict[str, dict[str, object]] = {}
    for det in sc:
        for q, k in RULES:
            thr = (
                m.calibration.quantiles[q]
                if det == "lstm_ae"
                else float(np.percentile(val_scores[det], float(q[1:])))
            )
            r = evaluate_detector(scored, det, thr, m.window, m.stride, k=k)
            results[f"{det}@{q}x{k}"] = r.to_dict()
    return {
        "window_level": window_auc,
        "rules": results,
        "heldout_file": heldout.name,
        "heldout_sha256": sha256_file(heldout),
        "eval_seed": EVAL_SEED,
    }


def _row(name: str, r: dict) -> str:
    ev, pt = r["event"], r["point"]
    return (
        f"| {name} | {ev['n_detected']}/{ev['n_events']} | {_fmt(ev['median_lead_time'] / 60)} | "
        f"{_fmt(ev['median_time_to_detect'] / 60)} | {_fmt(r['false_alerts_per_device_day'])} | "
        f"{r['alerts_in_sensor_faults']} | {_fmt(pt['precision'])} | {_fmt(pt['recall'])} | {_fmt(pt['f1'])} |"
    )


def _prow(name: str, r: dict) -> str:
    ev, pt = r.get("event"), r.get("point")
    fa = f"{_fmt(r['false_alerts_per_device_day'])}"
    if not ev or not ev["n_events"]:
        return f"| {name} | - | - | - | {fa} | {r['alerts_in_sensor_faults']} | - | - | - |"
    return (
        f"| {name} | {ev['n_detected']}/{ev['n_events']} | {_fmt(ev['median_lead_time'] / 60)} | "
        f"{_fmt(ev['median_time_to_detect'] / 60)} | {fa} | {r['alerts_in_sensor_faults']} | "
        f"{_fmt(pt['precision'])} | {_fmt(pt['recall'])} | {_fmt(pt['f1'])} |"
    )


PRODUCT_HEAD = [
    "| detector (threshold, alerts) | events found | median lead before failure (min) | median time to "
    "detect (min) | false alerts / device-day | of which in sensor faults | point P | point R | point F1 |",
    "|---|---|---|---|---|---|---|---|---|",
]


def product_markdown(prod: dict) -> str:
    st = StageSettings()
    t, a = st.threshold, st.alerts
    lines = [
        "",
        "## Held-out evaluation through the product (replay -> threshold -> alerts)",
        "",
        f"Each held-out day (3 pumps, 24 h; seeds {EVAL_SEED} mixed and {HEALTHY_SEED} healthy, never used "
        "for a choice) is replayed through the agent's own pipeline with `StageSettings()` defaults: "
        f"threshold `{t.kind}` (quantile {t.quantile}, floor {t.floor_factor} x {t.floor_quantile}, start "
        f"{t.start_quantile}, history {t.history}), alert when {a.open_k} of {a.open_n} windows are "
        f"anomalous, resolve after {a.resolve_m} windows under {a.recovery_ratio} x threshold. Alert spans "
        "are scored with `agent.report.evaluate_replay`: an event (machine fault, degrading -> failed -> "
        "repair) is found when an alert overlaps it; lead = first failed row - first alert; a false alert "
        "is an alert overlapping no machine fault. Point metrics count every row while an alert is open. "
        "Isolation Forests: their window scores on the very windows the pipeline scored, through the same "
        "threshold and alert classes, calibrated on their own validation-window quantiles.",
    ]
    for label, v in prod.items():
        rows = v["rows"]
        lines += ["", f"### {label} (`{v['file']}`, {v['windows']} windows)", "", *PRODUCT_HEAD]
        lines += [_prow(("**" + n + "**") if n == "lstm_ae" else n, r) for n, r in rows.items()]
        pf = rows["lstm_ae"].get("per_fault")
        if pf:
            lines += [
                "",
                "Per fault (LSTM-AE, product defaults):",
                "",
                "| fault | events | detected | median lead (min) |",
                "|---|---|---|---|",
                *(
                    f"| {f} | {int(x['events'])} | {int(x['detected'])} | {_fmt(x['median_lead_s'] / 60)} |"
                    for f, x in pf.items()
                ),
            ]
    return "\n".join(lines) + "\n"


def heldout_markdown(ev: dict) -> str:
    q, k = HEADLINE
    rules = ev["rules"]
    head = ["lstm_ae", "iforest_stats", "iforest_flat"]
    lines = [
        "",
        f"## Window-level view (secondary; seed {EVAL_SEED}): error > a calibrated quantile, no alert logic",
        "",
        "This is NOT what a user gets (see the product section above); it isolates the model from the "
        "threshold and alert stages. Streaming: a window every stride samples, judged when its last sample arrives. Events = machine-fault "
        "label runs (degrading -> failed -> repair); lead time = first failed row - first alert; false alerts = "
        "alert spans overlapping no machine fault (those during sensor faults are counted in the next column too).",
        f"Reference rule: error > calibrated {q}, each window alone (x{k}). The Isolation "
        "Forests use the same quantile of their own scores on the same validation windows.",
        "",
        "| detector @ rule | events found | median lead (min) | median time to detect (min) | false alerts / "
        "device-day | of which in sensor faults | point P | point R | point F1 |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_row(f"**{d} @ {q} x{k}**", rules[f"{d}@{q}x{k}"]) for d in head),
        "",
        "Sensitivity (other rules):",
        "",
        "| detector @ rule | events found | median lead (min) | median time to detect (min) | false alerts / "
        "device-day | of which in sensor faults | point P | point R | point F1 |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_row(name, r) for name, r in rules.items() if not name.endswith(f"@{q}x{k}")),
        "",
        "Per fault (LSTM-AE, headline rule):",
        "",
        "| fault | events | detected | median lead (min) |",
        "|---|---|---|---|",
        *(
            f"| {f} | {int(v['events'])} | {int(v['detected'])} | {_fmt(v['median_lead_s'] / 60)} |"
            for f, v in rules[f"lstm_ae@{q}x{k}"]["per_fault"].items()
        ),
        "",
        "Window level (machine-fault windows vs clean normal windows):",
        "",
        "| detector | AUC-ROC | average precision |",
        "|---|---|---|",
        *(
            f"| {n} | {v['auc_roc']:.4f} | {v['average_precision']:.4f} |"
            for n, v in ev["window_level"].items()
        ),
        "",
        f"![held-out errors]({PLOTS}/heldout_errors.png)",
        f"![held-out precision-recall]({PLOTS}/heldout_pr.png)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/default", help="bundle directory")
    ap.add_argument("--keep-data", default=None, help="directory to keep the recorded CSVs in")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    out = Path(args.out)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(args.keep_data) if args.keep_data else Path(tmpd)
        tmp.mkdir(parents=True, exist_ok=True)
        train, heldout, healthy = record_days(tmp)
        log.info(
            "recorded %s, %s, %s in %.1f s", train.name, heldout.name, healthy.name, time.perf_counter() - t0
        )
        res = build_bundle([train], out, default_config())
        bundle = load_bundle(out)
        iforests = fit_iforests(res, bundle)
        prod = evaluate_product(
            bundle,
            res,
            {f"mixed day, seed {EVAL_SEED}": heldout, f"healthy day, seed {HEALTHY_SEED}": healthy},
            iforests,
        )
        ev = evaluate_heldout(out, res, heldout, iforests)
    ev = {"product": prod, **ev, "healthy_seed": HEALTHY_SEED}
    (out / "eval.json").write_text(json.dumps(ev, indent=2, default=float) + "\n")
    with open(out / "report.md", "a", encoding="utf-8") as f:
        f.write(product_markdown(prod))
        f.write(heldout_markdown(ev))
    mixed = prod[f"mixed day, seed {EVAL_SEED}"]["rows"]["lstm_ae"]  # type: ignore[index]
    healthy_fa = prod[f"healthy day, seed {HEALTHY_SEED}"]["rows"]["lstm_ae"]["false_alerts_per_device_day"]  # type: ignore[index]
    manifest = res.manifest.model_copy(deep=True)
    manifest.training["heldout_eval"] = {
        "rule": "product: StageSettings() defaults (replay)",
        "event_recall": mixed["event"]["recall"],
        "false_alerts_per_device_day": mixed["false_alerts_per_device_day"],
        "false_alerts_per_device_day_healthy": healthy_fa,
        "median_lead_time_s": mixed["event"]["median_lead_time"],
        "median_time_to_detect_s": mixed["event"]["median_time_to_detect"],
        "eval_seed": EVAL_SEED,
        "healthy_seed": HEALTHY_SEED,
    }
    manifest.training["total_seconds"] = round(time.perf_counter() - t0, 1)
    finalize_bundle(out, manifest)
    load_bundle(out)  # the committed bundle must verify
    print(
        f"models/default: {manifest.training['model_bytes_int8']} bytes int8; product path on held-out days: "
        f"event recall {mixed['event']['recall']:.2f}, false alerts/device-day {mixed['false_alerts_per_device_day']:.2f} "
        f"(healthy day {healthy_fa:.2f}), median lead {mixed['event']['median_lead_time'] / 60:.1f} min; "
        f"total {manifest.training['total_seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
