"""`edgewatch train`: command-line arguments -> PipelineConfig -> bundle."""

from __future__ import annotations

import argparse
import logging
import sys

from training.data import DataError
from training.export import ExportError
from training.model import ModelConfig
from training.pipeline import PipelineConfig, build_bundle
from training.train import TrainConfig


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig(
        channels=args.channels,
        window=args.window,
        stride=args.stride,
        period=args.period,
        max_gap_s=getattr(args, "max_gap", None),
        normal_until=args.normal_until,
        model=ModelConfig(hidden=args.hidden, layers=args.layers),
        train=TrainConfig(
            epochs=args.epochs,
            seed=args.seed,
            max_train_windows=getattr(args, "max_train_windows", None),
            progress=sys.stderr.isatty(),
        ),
        report=not args.no_report,
    )


def run_train(args: argparse.Namespace) -> int:
    """Train and write the bundle; exit 0 on success, 2 on bad data, 3 when a model gate fails."""
    # root at WARNING: onnxruntime.quantization logs chatter through the root logger at INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    try:
        cfg = config_from_args(args)
        res = build_bundle(args.data, args.out, cfg)
    except DataError as e:
        print(f"edgewatch train: bad input: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"edgewatch train: MODEL REFUSED: {e}", file=sys.stderr)
        return 3
    m = res.manifest
    q = m.calibration.quantiles
    print(
        f"bundle written to {args.out}: {m.training['model_bytes_int8']} bytes int8, "
        f"{m.training['epochs_run']} epochs in {m.training['train_seconds']} s, "
        f"p99 {q['p99']:.4g}, p99.9 {q['p99.9']:.4g}, parity Spearman {m.parity.spearman:.5f}"
        if m.parity
        else f"bundle written to {args.out}"
    )
    return 0
