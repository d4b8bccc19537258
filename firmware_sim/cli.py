"""`edgewatch sim ...` subcommands: record a CSV, stream over serial (pty or port) or MQTT.

Arguments are validated into `SimConfig` (pydantic) so a bad value fails with a clear message before
anything starts. Streaming modules are imported lazily: `record` needs neither pyserial nor paho.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime

from pydantic import ValidationError

from firmware_sim.config import SimConfig
from firmware_sim.scenario import BUILDERS, DESCRIPTIONS, Scenario, build_scenario

DAY = 86400.0
ENDLESS_DAYS = 366  # an endless `mixed` stream repeats its day of faults for a year


def parse_iso(text: str) -> int:
    """ISO 8601 to epoch ms; a time without zone is taken as UTC."""
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def _common(p: argparse.ArgumentParser, default_devices: int = 1) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--devices", type=int, default=default_devices, help="number of pumps (pump-01, ...)")
    p.add_argument(
        "--scenario", default="normal", choices=sorted(BUILDERS), metavar="NAME", help="fault schedule"
    )
    p.add_argument("--rate", type=float, default=1.0, help="samples per second per device (default 1)")
    p.add_argument("--fault-after", type=float, default=None, metavar="S", help="sim seconds until the fault")
    p.add_argument(
        "--degradation",
        type=float,
        default=None,
        metavar="S",
        help="sim seconds of degradation before failure",
    )
    p.add_argument("--duration", type=float, default=None, metavar="S", help="sim seconds to produce")
    p.add_argument(
        "--start", type=parse_iso, default=None, metavar="ISO", help="device clock of the first reading"
    )


def _stream_common(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--speed", type=float, default=1.0, help="sim seconds per wall second (default 1 = real time)"
    )


def _config(args: argparse.Namespace, start_ms: int, duration: float | None) -> SimConfig:
    try:
        return SimConfig(
            seed=args.seed,
            devices=args.devices,
            scenario=args.scenario,
            rate=args.rate,
            fault_after=args.fault_after,
            degradation=args.degradation,
            duration=duration,
            start_ms=start_ms,
            speed=getattr(args, "speed", 1.0),
        )
    except ValidationError as e:
        raise SystemExit(f"edgewatch sim: invalid arguments:\n{e}") from None


def _scenario(cfg: SimConfig) -> Scenario:
    horizon = cfg.duration if cfg.duration is not None else DAY
    sc = build_scenario(cfg.scenario, cfg.devices, horizon, cfg.fault_after, cfg.degradation, cfg.seed)
    if cfg.duration is None and cfg.scenario == "mixed":
        sc = sc.repeated(DAY, ENDLESS_DAYS)  # every fault ends repaired, so the day can repeat
    return sc


def stream_start_ms(args: argparse.Namespace) -> int:
    """Speed 1: now. Faster: now - 24 h, so a catch-up feed stays in the past for a while."""
    if args.start is not None:
        return args.start
    now = int(time.time() * 1000)
    return now if args.speed <= 1.0 else now - int(DAY * 1000)


def _run_record(args: argparse.Namespace) -> int:
    from firmware_sim.record import DEFAULT_START, record

    duration = args.duration if args.duration is not None else args.hours * 3600.0
    start = args.start if args.start is not None else int(DEFAULT_START.timestamp() * 1000)
    cfg = _config(args, start, duration)
    t0 = time.perf_counter()
    rows = record(args.out, cfg.seed, cfg.devices, _scenario(cfg), cfg.start_ms, duration, cfg.rate)
    print(f"wrote {rows} rows to {args.out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _run_scenarios(args: argparse.Namespace) -> int:
    width = max(map(len, DESCRIPTIONS))
    for name in BUILDERS:
        print(f"{name:<{width}}  {DESCRIPTIONS[name]}")
    return 0


def _run_serial(args: argparse.Namespace) -> int:
    from firmware_sim.stream import run_serial

    cfg = _config(args, stream_start_ms(args), args.duration)
    return run_serial(cfg, _scenario(cfg), port=args.port, pty=args.pty)


def _run_mqtt(args: argparse.Namespace) -> int:
    from firmware_sim.stream import run_mqtt

    cfg = _config(args, stream_start_ms(args), args.duration)
    return run_mqtt(
        cfg, _scenario(cfg), broker=args.broker, prefix=args.prefix, qos=args.qos, batch=args.batch
    )


def _batch_size(text: str) -> int:
    """--batch: 1..MAX_SIM_BATCH, checked before anything connects."""
    from firmware_sim.stream import MAX_SIM_BATCH

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= n <= MAX_SIM_BATCH:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_SIM_BATCH}, got {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator subcommands to the `sim` parser."""
    sub = parser.add_subparsers(dest="sim_command", required=True, metavar="SUBCOMMAND")

    fmt = argparse.RawDescriptionHelpFormatter
    r = sub.add_parser(
        "record",
        help="write a labelled CSV recording (fast, deterministic)",
        formatter_class=fmt,
        epilog="examples:\n"
        "  edgewatch sim record --out normal.csv --seed 1 --devices 3 --hours 24 --rate 1\n"
        "  edgewatch sim record --out mixed.csv --seed 2 --hours 48 --scenario mixed\n"
        "  edgewatch sim record --out bw.csv --devices 1 --duration 7200 --scenario bearing_wear \\\n"
        "      --fault-after 1800 --degradation 3600 --start 2026-12-01T00:00:00Z\n"
        "default start: 2026-12-01T00:00:00Z, so the file is byte-identical on every run.",
    )
    r.add_argument("--out", required=True, help="CSV file to write")
    r.add_argument("--hours", type=float, default=24.0, help="sim hours to record (default 24)")
    _common(r, default_devices=3)
    r.set_defaults(handler=_run_record)

    s = sub.add_parser(
        "serial",
        help="stream protocol lines to a serial port or a new pty",
        formatter_class=fmt,
        epilog="examples:\n"
        "  edgewatch sim serial --pty --seed 7 --devices 2\n"
        "  edgewatch sim serial --pty --seed 7 --speed 20 --scenario bearing_wear --fault-after 900 --degradation 900\n"
        "  edgewatch sim serial --port /dev/ttyUSB0 --seed 1 --duration 3600\n"
        "With --pty the first stdout line is `serial port: /dev/pts/N`. Speed 1 starts the device clock\n"
        "at now; a faster speed starts it 24 h back (a catch-up feed). Stop with Ctrl-C / SIGTERM.",
    )
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="create a pty; first stdout line names its device")
    where.add_argument("--port", metavar="DEV", help="serial device to write to (115200 8N1)")
    _stream_common(s)
    s.set_defaults(handler=_run_serial)

    m = sub.add_parser(
        "mqtt",
        help="publish telemetry JSON to an MQTT broker",
        formatter_class=fmt,
        epilog="examples:\n"
        "  edgewatch sim mqtt --broker 127.0.0.1:1883 --seed 3 --devices 3\n"
        "  edgewatch sim mqtt --broker gw:1883 --prefix plant1/sensors --speed 60 --scenario mixed --qos 0\n"
        "  edgewatch sim mqtt --broker 127.0.0.1:1883 --devices 10 --rate 100 --batch 10\n"
        "Topic: <prefix>/<device>/telemetry, payload per docs/protocol.md.",
    )
    m.add_argument("--broker", required=True, metavar="HOST:PORT", help="MQTT broker address")
    m.add_argument("--prefix", default="edgewatch/sensors", help="topic prefix (default edgewatch/sensors)")
    m.add_argument("--qos", type=int, choices=(0, 1), default=1, help="MQTT QoS (default 1)")
    m.add_argument(
        "--batch",
        type=_batch_size,
        default=1,
        metavar="N",
        help="up to N readings of a device per message (batch payload, 1..500; default 1 = one "
        "reading per message); a message never waits for a later pacing tick",
    )
    _stream_common(m)
    m.set_defaults(handler=_run_mqtt)

    c = sub.add_parser("scenarios", help="list scenarios with a one-line description")
    c.set_defaults(handler=_run_scenarios)
