"""`edgewatch` command line: a thin layer over library functions.

Each command group has one `_add_*` function that declares its arguments and a handler that imports
its implementation lazily, so `edgewatch --help` stays fast and a gateway without the `train` extra
can still run every agent command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int | None]


def _need_train_extra(feature: str) -> None:
    """Fail clearly when torch/scikit-learn are not installed (gateway install)."""
    import importlib.util

    missing = [m for m in ("torch", "sklearn", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"edgewatch {feature} needs the 'train' extra (missing: {', '.join(missing)}).\n"
            "Install it on a workstation with:  pip install 'edgewatch[train]'\n"
            "(torch is pinned to 2.13.0; see README for the CPU-only wheel.)"
        )


def _add_sim(sub: argparse._SubParsersAction) -> None:
    from firmware_sim.cli import add_arguments

    p = sub.add_parser("sim", help="firmware simulator: a pump's sensors over serial, MQTT or to a CSV file")
    add_arguments(p)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an LSTM autoencoder and write an int8 ONNX model bundle")
    p.add_argument("data", nargs="+", help="CSV recordings (simulator, SKAB or agent export)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--channels", nargs="+", help="channel columns to use, in order (default: all known)")
    p.add_argument("--window", type=int, default=64, help="window length in samples")
    p.add_argument("--stride", type=int, default=8, help="windows start every STRIDE samples")
    p.add_argument("--period", type=float, default=None, help="sample period in seconds (default: inferred)")
    p.add_argument("--epochs", type=int, default=30, help="maximum training epochs (early stopping)")
    p.add_argument("--hidden", type=int, default=32, help="LSTM hidden size")
    p.add_argument("--layers", type=int, default=1, help="LSTM layers")
    p.add_argument("--seed", type=int, default=0, help="random seed for training")
    p.add_argument(
        "--normal-until", default=None, help="ISO time: rows before it are normal (unlabelled data)"
    )
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots")
    p.add_argument(
        "--max-gap", type=float, default=None, help="longest gap (s) to interpolate (default: 5 periods)"
    )
    p.add_argument(
        "--max-train-windows",
        type=int,
        default=None,
        help="training windows sampled per epoch (default: all)",
    )

    def handler(args: argparse.Namespace) -> int | None:
        _need_train_extra("train")
        from training.cli import run_train

        return run_train(args)

    p.set_defaults(handler=handler)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate detectors on labelled data (SKAB benchmark, cheap screen)")
    esub = p.add_subparsers(dest="eval_command", required=True)
    s = esub.add_parser("skab", help="SKAB benchmark under its published protocol")
    s.add_argument("--data", required=True, help="SKAB data directory (valve1/, valve2/, other/)")
    s.add_argument("--out", default=None, help="directory for metrics.json and the report")
    s.add_argument("--seeds", nargs="+", default=None, help="training seeds to average (default: 0 1 2)")
    s.add_argument("--epochs", type=int, default=None, help="maximum training epochs (default: the recipe's)")
    s.add_argument("--window", type=int, default=None, help="window length in rows (default: the recipe's)")
    s.add_argument("--jobs", type=int, default=2, help="models trained at once (worker processes; default 2)")
    s.add_argument("-v", "--verbose", action="store_true", help="log per-file progress")

    def handler(args: argparse.Namespace) -> int | None:
        _need_train_extra("eval")
        from training.skab import run_skab_cli

        return run_skab_cli(args)

    s.set_defaults(handler=handler)

    c = esub.add_parser(
        "screen", help="cheap screen: CPU saved vs detection lost, replaying simulator days (docs/results.md)"
    )
    c.add_argument(
        "--model", default="models/default", help="model bundle directory (default: models/default)"
    )
    c.add_argument("--data", default=None, help="directory for the recorded days (kept; default: a temp dir)")
    c.add_argument("--hours", type=float, default=24.0, help="hours recorded per day (default 24)")
    c.add_argument(
        "--repeats", type=int, default=3, help="replays per setting; CPU is their median (default 3)"
    )
    c.add_argument("--out", default=None, help="directory for screen.json and screen.md")
    c.add_argument("-v", "--verbose", action="store_true", help="log each replay")

    def screen_handler(args: argparse.Namespace) -> int | None:
        # numpy and the agent only: runs on a gateway install too (no torch, no scikit-learn)
        from training.screen_eval import run_screen_cli

        return run_screen_cli(args)

    c.set_defaults(handler=screen_handler)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the agent (sources -> model -> alerts -> uplink)")
    p.add_argument("--config", required=True, help="TOML configuration file")

    def handler(args: argparse.Namespace) -> int | None:
        from agent.service import run_from_cli

        return run_from_cli(args)

    p.set_defaults(handler=handler)


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a configuration file and print the effective settings")
    c.add_argument("file", help="TOML configuration file")

    def handler(args: argparse.Namespace) -> int | None:
        from agent.config import check_cli

        return check_cli(args)

    c.set_defaults(handler=handler)


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="replay recordings (simulator/export CSV, SKAB CSV, an agent database) through the live pipeline",
    )
    p.add_argument("files", nargs="+", help="CSV recordings or an agent's edgewatch.db")
    p.add_argument(
        "--model", default="models/default", help="model bundle directory (default: models/default)"
    )
    p.add_argument(
        "--config", default=None, help="agent config whose stage settings to use (default: defaults)"
    )
    p.add_argument("--speed", default="max", help="'max' (default) or a factor of data time, e.g. 10")
    p.add_argument(
        "--db", default=None, help="SQLite file for the replay's buffer and state (default: temporary)"
    )
    p.add_argument("--report", default=None, help="directory for report.md, metrics.json and plots")
    p.add_argument(
        "--events", default="-", help="where to write alert/health events as JSON lines (- = stdout)"
    )
    p.add_argument("--device", nargs="+", default=None, help="only these devices")
    p.add_argument("--since", default=None, help="from this time (ISO 8601 or epoch s; database input)")
    p.add_argument("--until", default=None, help="up to this time (ISO 8601 or epoch s; database input)")

    def handler(args: argparse.Namespace) -> int | None:
        from agent.replay import run_replay_cli

        return run_replay_cli(args)

    p.set_defaults(handler=handler)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write readings from an agent database as a recording CSV")
    p.add_argument("--db", required=True, help="the agent's edgewatch.db")
    p.add_argument("--out", required=True, help="CSV file to write (recording format, see docs/protocol.md)")
    p.add_argument("--device", nargs="+", default=None, help="devices to export (default: all)")
    p.add_argument("--since", default=None, help="from this time (ISO 8601 or epoch s)")
    p.add_argument("--until", default=None, help="up to this time (ISO 8601 or epoch s)")
    p.add_argument(
        "--labels",
        action="store_true",
        help="fill machine_state/fault from the analysts' labels: a training set for `edgewatch train` "
        "(false positives count as normal, true positives as faults; docs/model.md)",
    )

    def handler(args: argparse.Namespace) -> int | None:
        from agent.export import run_export_cli

        return run_export_cli(args)

    p.set_defaults(handler=handler)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure speed, memory, CPU and size against references (docs/benchmarks.md)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, slow rows skipped (< 60 s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--out", default=None, metavar="FILE", help="write the markdown report (e.g. docs/benchmarks.md)"
    )
    p.add_argument(
        "--skab",
        default="/work/shared/datasets/skab",
        metavar="DIR",
        help="SKAB data directory (row skipped if absent)",
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="SECTIONS",
        help="run only these comma-separated sections (model, replay, skab, install, ingest, steady, "
        "latency) and print their rows; not with --out",
    )

    def handler(args: argparse.Namespace) -> int | None:
        from agent.bench import run_bench_cli

        return run_bench_cli(args)

    p.set_defaults(handler=handler)


def _add_fleet(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet", help="live table of the gateways publishing to a broker: devices, open alerts, outbox depth"
    )
    p.add_argument("--broker", default=None, metavar="HOST:PORT", help="MQTT broker (overrides --config)")
    p.add_argument(
        "--config", default=None, metavar="FILE", help="take broker, TLS, credentials and prefix from "
        "this agent config's [uplink] section (never its client_id)",
    )  # fmt: skip
    p.add_argument("--prefix", default=None, help="topic prefix (default: the config's, else edgewatch)")
    p.add_argument("--once", type=float, default=None, metavar="SECONDS",
                   help="listen this long, print one snapshot and exit (default: redraw every second)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the state as JSON (one line per snapshot)")
    p.add_argument(
        "--stale-after", type=float, default=180.0, metavar="SECONDS",
        help="an online gateway silent this long shows as stale (default 180 = 3 default heartbeats)",
    )  # fmt: skip
    p.add_argument(
        "--client-id", default=None, help="fixed client id with a persistent session: the broker queues "
        "alerts for it while it is away (default: a fresh id and a clean session)",
    )  # fmt: skip
    p.add_argument("--username", default=None, help="broker user name")
    p.add_argument(
        "--password-env", default=None, metavar="VAR", help="environment variable with the password"
    )
    p.add_argument("--tls", action="store_true", help="TLS (server certificate always verified; port 8883)")
    p.add_argument("--ca-file", default=None, metavar="PEM", help="CA that signed the broker's certificate")
    p.add_argument("--cert-file", default=None, metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--key-file", default=None, metavar="PEM", help="client private key (mutual TLS)")

    def handler(args: argparse.Namespace) -> int | None:
        from agent.fleet import run_fleet_cli

        return run_fleet_cli(args)

    p.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgewatch", description="Predictive-maintenance agent for edge gateways."
    )
    from agent import __version__

    parser.add_argument("--version", action="version", version=f"edgewatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_run,
        _add_config,
        _add_sim,
        _add_replay,
        _add_export,
        _add_train,
        _add_eval,
        _add_bench,
        _add_fleet,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:  # a group given without its subcommand
        build_parser().parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
