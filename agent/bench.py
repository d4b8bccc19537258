"""`edgewatch bench`: every performance figure of issue #6 next to the reference it is compared with.

One run measures the model (int8 vs ORT fp32 vs torch fp32), replay end to end vs a raw SQLite insert,
SKAB through the whole agent, live MQTT ingest through a real mosquitto vs the publisher alone, alert
latency, the agent's RSS and CPU vs python + numpy + onnxruntime alone, and install sizes, then writes
`docs/benchmarks.md` and optionally JSON. Numbers are medians over repeats where a figure is cheap
enough to repeat. torch is only ever imported in a child process, so this module is gateway-safe.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"
SKAB_DIR = Path("/work/shared/datasets/skab")
BIN = Path(sys.executable).parent
DEVICES_SECS_SPEED = (8, 3600, 100.0)  # alert latency run: 800 readings/s, inside capacity
EDGEWATCH = str(BIN / "edgewatch")


@dataclass
class Row:
    """One figure: what was measured, the reference measured in the same run, and the goal."""

    section: str
    figure: str
    value: float | None
    unit: str
    reference: str = ""
    ref_value: float | None = None
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class BenchReport:
    """Everything one `edgewatch bench` run produced (what `--json` writes)."""

    quick: bool
    started: str
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# -- helpers -------------------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def machine_info() -> dict[str, Any]:
    """CPU, memory, OS and the versions that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        mem_gib = round(kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    versions: dict[str, str] = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for dist in ("numpy", "onnxruntime", "paho-mqtt", "sqlite-utils", "torch", "edgewatch"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    try:
        out = subprocess.run(
            [_mosquitto(), "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        m = re.search(r"mosquitto version (\S+)", out)
        versions["mosquitto"] = m.group(1) if m else "?"
    except (OSError, subprocess.TimeoutExpired):
        versions["mosquitto"] = "not found"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "versions": versions,
    }


def _mosquitto() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record(out: Path, *args: str) -> list[Any]:
    """A simulator recording (the real `edgewatch sim record`), read back as Recordings."""
    from agent.recording import read_recording

    subprocess.run([EDGEWATCH, "sim", "record", "--out", str(out), *args], check=True, capture_output=True)
    return read_recording(out, channels=["temperature", "vibration", "pressure"])


# -- model ---------------------------------------------------------------------------------------
def _windows(n: int, window: int, channels: int, seed: int = 0) -> np.ndarray:
    """Scaled model inputs (the same for every runtime); timing does not depend on the values."""
    return np.random.default_rng(seed).standard_normal((n, window, channels)).astype(np.float32)


def _time_calls(fn: Callable[[np.ndarray], Any], xs: np.ndarray, batch: int, reps: int) -> list[float]:
    """Seconds per call of `fn` on consecutive batches of `xs` (after a short warm-up)."""
    for i in range(min(20, reps)):
        fn(xs[(i * batch) % len(xs) : (i * batch) % len(xs) + batch])
    out: list[float] = []
    for i in range(reps):
        lo = (i * batch) % (len(xs) - batch + 1)
        x = xs[lo : lo + batch]
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def torch_timings(spec_json: str) -> None:
    """Child-process entry: torch fp32 timings of the bundle's architecture (printed as JSON).

    Weights are freshly initialised (the bundle ships ONNX only): an LSTM's cost does not depend on
    its weight values, only on its shape."""
    import torch

    from training.model import LSTMAutoencoder

    spec = json.loads(spec_json)
    torch.set_num_threads(1)
    model = LSTMAutoencoder(spec["channels"], hidden=spec["hidden"], layers=spec["layers"]).eval()
    xs = torch.from_numpy(_windows(2048, spec["window"], spec["channels"]))
    res: dict[str, list[float]] = {}
    with torch.inference_mode():
        fn = model.__call__
        res["b1"] = _time_calls(fn, xs, 1, spec["reps"])  # type: ignore[arg-type]
        for b in (32, 256):
            res[f"b{b}"] = _time_calls(fn, xs, b, spec["batch_reps"])  # type: ignore[arg-type]
    print(json.dumps(res))


def bench_model(quick: bool, repeats: int) -> list[Row]:
    """Single-window latency and batch throughput: shipped int8 vs ORT fp32 vs torch fp32."""
    from agent.bundle import _make_session, load_bundle

    bundle = load_bundle(MODEL, threads=1)
    m = bundle.manifest
    window, ch = m.window, len(m.channel_names)
    reps, batch_reps = (300, 10) if quick else (3000, 40)
    xs = _windows(2048, window, ch)
    sessions = {"int8": bundle.session}
    fp32 = MODEL / "model.fp32.onnx"
    if fp32.exists():
        sessions["ORT fp32"] = _make_session(fp32, 1)
    stats: dict[str, dict[str, list[float]]] = {k: {} for k in sessions}
    for _ in range(repeats):
        for name, sess in sessions.items():
            inp = sess.get_inputs()[0].name

            def run(x: np.ndarray, sess: Any = sess, inp: str = inp) -> Any:
                return sess.run(None, {inp: x})

            t = _time_calls(run, xs, 1, reps)
            stats[name].setdefault("p50", []).append(_pct(t, 50) * 1e3)
            stats[name].setdefault("p99", []).append(_pct(t, 99) * 1e3)
            for b in (32, 256):
                tb = _time_calls(run, xs, b, batch_reps)
                stats[name].setdefault(f"b{b}", []).append(b / _median(tb))
    arch = m.architecture
    hidden, layers = getattr(arch, "hidden", 32), getattr(arch, "layers", 1)
    torch_note = ""
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise RuntimeError("torch not installed (gateway install): torch column skipped")
        spec = json.dumps(
            {
                "channels": ch,
                "hidden": hidden,
                "layers": layers,
                "window": window,
                "reps": reps,
                "batch_reps": batch_reps,
            }
        )
        tstats: dict[str, list[float]] = {}
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-c", f"from agent.bench import torch_timings; torch_timings({spec!r})"],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
                timeout=300,
            ).stdout
            t = json.loads(out.strip().splitlines()[-1])
            tstats.setdefault("p50", []).append(_pct(t["b1"], 50) * 1e3)
            tstats.setdefault("p99", []).append(_pct(t["b1"], 99) * 1e3)
            for b in (32, 256):
                tstats.setdefault(f"b{b}", []).append(b / _median(t[f"b{b}"]))
        stats["torch fp32"] = tstats
    except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        torch_note = str(exc)[:200]
    med = {k: {s: _median(v) for s, v in d.items()} for k, d in stats.items()}
    shape = f"H{hidden}/L{layers}, T={window}, {ch} ch"
    rows: list[Row] = []
    i8 = med["int8"]
    for name in med:
        if name == "int8":
            continue
        rows.append(
            Row(
                "model",
                f"1 window, {shape}, 1 thread: p50 ({name} reference)",
                med[name]["p50"],
                "ms",
                reference=name,
                ref_value=med[name]["p50"],
                note=f"p99 {med[name]['p99']:.3f} ms",
            )
        )
    tf = med.get("torch fp32")
    rows.insert(
        0,
        Row(
            "model",
            f"int8 1 window, {shape}, 1 thread: p99",
            i8["p99"],
            "ms",
            reference="torch fp32 p50" if tf else "",
            ref_value=tf["p50"] if tf else None,
            ratio=tf["p50"] / i8["p50"] if tf else None,
            goal="p99 <= 0.5 ms; torch/int8 p50 >= 3x",
            met=(i8["p99"] <= 0.5) and (tf is None or tf["p50"] / i8["p50"] >= 3.0),
            note=f"int8 p50 {i8['p50']:.3f} ms" + (f"; {torch_note}" if torch_note else ""),
        ),
    )
    for b in (32, 256):
        ref = med.get("ORT fp32")
        others = "; ".join(f"{k} {v[f'b{b}']:,.0f}/s" for k, v in med.items() if k != "int8")
        rows.append(
            Row(
                "model",
                f"int8 throughput at batch {b}",
                i8[f"b{b}"],
                "windows/s",
                reference="ORT fp32",
                ref_value=ref[f"b{b}"] if ref else None,
                ratio=i8[f"b{b}"] / ref[f"b{b}"] if ref else None,
                goal="int8 >= fp32",
                met=(ref is None) or i8[f"b{b}"] >= ref[f"b{b}"],
                note=others,
            )
        )
    return rows


# -- replay --------------------------------------------------------------------------------------
def _raw_insert_rate(recordings: list[Any], tmp: Path, batch: int = 100) -> float:
    """The buffer's physical floor: `executemany` of the same rows into the agent's own schema."""
    from agent.buffer import _reading_row
    from agent.db import open_db
    from agent.recording import iter_readings

    rows = [_reading_row(r) for r in iter_readings(recordings)]
    db = open_db(tmp / "raw.db")
    conn = db.conn
    sql = "INSERT INTO readings (device, ts, seq, received, values_json) VALUES (?, ?, ?, ?, ?)"
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows[i : i + batch])
        conn.execute("COMMIT")
    dt = time.perf_counter() - t0
    conn.close()
    return len(rows) / dt


def _replay_once(recordings: list[Any], bundle: Any, db_path: Path) -> Any:
    from agent.db import open_db
    from agent.pipeline import StageSettings, build_pipeline
    from agent.replay import replay

    db = open_db(db_path)
    try:

        def factory(emit: Any, on_judgement: Any) -> Any:
            return build_pipeline(StageSettings(), bundle, db, emit, on_judgement=on_judgement)

        return replay(recordings, factory)
    finally:
        db.conn.close()


def bench_replay(quick: bool, tmp: Path) -> list[Row]:
    """Replay end to end (parse-free: readings from a recording) vs the raw SQLite insert floor."""
    from agent.bundle import load_bundle

    devices, hours = (1, 3.0) if quick else (10, 27.78)
    recs = _record(
        tmp / "replay.csv", "--devices", str(devices), "--hours", str(hours), "--scenario", "mixed"
    )
    n = sum(len(r) for r in recs)
    raw = _median([_raw_insert_rate(recs, Path(tempfile.mkdtemp(dir=tmp))) for _ in range(3)])
    bundle = load_bundle(MODEL)
    res = _replay_once(recs, bundle, tmp / "replay.db")
    rate = res.readings / res.seconds
    return [
        Row(
            "replay",
            f"replay end to end, {n:,} readings ({devices} devices, sim 'mixed')",
            rate,
            "readings/s",
            reference="raw executemany insert, 100 rows/txn",
            ref_value=raw,
            ratio=rate / raw,
            goal=">= 100k readings/s on one core",
            met=rate >= 100_000,
            note=f"{res.seconds:.1f} s, {len(res.judgements):,} windows, {len(res.alerts())} alert messages; 1 run",
        )
    ]


def bench_skab(quick: bool, tmp: Path, data: Path) -> tuple[list[Row], list[str]]:
    """All SKAB rows through the whole agent, one 8-channel model (trained tiny, once, into tmp)."""
    from agent.bundle import load_bundle
    from agent.recording import SKAB_CHANNELS, read_recording

    free = data / "anomaly-free" / "anomaly-free.csv"
    if quick:
        return [], ["SKAB replay: skipped in --quick (trains a model)"]
    if not free.exists():
        return [], [f"SKAB replay: skipped, {free} not found (pass --skab DIR)"]
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return [], ["SKAB replay: skipped, training its 8-channel model needs the 'train' extra"]
    out = tmp / "skab_bundle"
    subprocess.run(
        [
            EDGEWATCH,
            "train",
            str(free),
            "--out",
            str(out),
            "--channels",
            *SKAB_CHANNELS,
            "--window",
            "32",
            "--stride",
            "8",
            "--epochs",
            "2",
            "--max-train-windows",
            "512",
            "--no-report",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    bundle = load_bundle(out)
    files = sorted(data.glob("*/*.csv"))
    t0 = time.perf_counter()
    recs = [r for f in files for r in read_recording(f, channels=SKAB_CHANNELS)]
    read_s = time.perf_counter() - t0
    n = sum(len(r) for r in recs)
    times = []
    for i in range(3):
        res = _replay_once(recs, bundle, tmp / f"skab{i}.db")
        times.append(res.seconds)
    s = _median(times)
    return [
        Row(
            "replay",
            f"SKAB: {n:,} rows of {len(files)} files, one 8-channel model (window 32, stride 8)",
            s,
            "s",
            goal="<= 2 s",
            met=s <= 2.0,
            note=f"{n / s:,.0f} rows/s; + {read_s:.2f} s to read the CSVs; {len(res.judgements):,} windows; "
            "median of 3; model trained tiny (2 epochs) just for timing",
        )
    ], []


# -- live agent over MQTT ------------------------------------------------------------------------
class _Broker:
    """A private mosquitto (persistence off, deep queues so the measurement, not the broker, decides)."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        conf = tmp / f"mosquitto-{self.port}.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 0\nmax_inflight_messages 100\n"
        )
        self.log = open(tmp / f"mosquitto-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=self.log
        )
        _wait_port(self.port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}") from None
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


@contextmanager
def _agent(tmp: Path, broker: _Broker, name: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """`edgewatch run` on the default model, MQTT in and out through `broker`, metrics on a free port."""
    state = tmp / f"state-{name}"
    state.mkdir()
    mport = _free_port()
    cfg = tmp / f"agent-{name}.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-bench"\nstate_dir = "{state}"\n\n'
        f'[[sources]]\ntype = "mqtt"\nname = "plant"\nqos = 1\nclient_id = "bench-src-{name}"\n'
        f'[sources.mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n\n'
        f'[model]\npath = "{MODEL}"\n\n[uplink]\nconsole = false\n\n'
        f'[uplink.mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n\n'
        f'[metrics]\nenabled = true\nhost = "127.0.0.1"\nport = {mport}\n'
    )
    log = open(tmp / f"agent-{name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([EDGEWATCH, "run", "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_port(mport, proc, 30)
        deadline = time.monotonic() + 15  # until the source has subscribed (the agent logs it)
        while time.monotonic() < deadline and "connected" not in (tmp / f"agent-{name}.log").read_text():
            time.sleep(0.05)
        time.sleep(0.3)
        yield proc, mport
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _metric_sum(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#") and "_created" not in line
    )


def _publisher(port: int, client_id: str) -> Any:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def _payloads(recs: list[Any], start_ms: int, size: int = 1) -> list[tuple[str, int, str, bytes]]:
    """(device, ts_ms, topic, payload) in time order; timestamps rebased to start at `start_ms`.

    One reading per message, or with `size` > 1 batch payloads of up to `size` consecutive readings
    of a device (ts_ms = their first reading's, so each device's order holds). seq = the row index.
    """
    from firmware_sim.wire import encode_json, encode_json_batch

    t0 = min(float(r.ts[0]) for r in recs)
    out = []
    for r in recs:
        dev = r.device
        topic = f"edgewatch/sensors/{dev}/telemetry"
        rows = []
        for i in range(len(r)):
            if r.arrived is not None and not r.arrived[i]:
                continue
            t, v, p = (float(x) for x in r.values[i])
            rows.append((i, start_ms + round((float(r.ts[i]) - t0) * 1000), t, v, p))
        for k in range(0, len(rows), size):
            part = rows[k : k + size]
            payload = encode_json(dev, *part[0]) if size == 1 else encode_json_batch(dev, part)
            out.append((dev, part[0][1], topic, payload))
    out.sort(key=lambda x: (x[1], x[0]))
    return out


def _publish_all(c: Any, msgs: list[tuple[str, int, str, bytes]]) -> float:
    """Publish everything at QoS 1 as fast as the broker acknowledges; returns seconds until all acked."""
    from collections import deque

    t0 = time.perf_counter()
    infos: deque[Any] = deque()
    for _, _, topic, payload in msgs:
        if len(infos) >= 30_000:  # message ids are 16 bit: never have a wrapped id still outstanding
            infos.popleft().wait_for_publish(60)
        infos.append(c.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    return time.perf_counter() - t0


def _ingest_once(tmp: Path, msgs: list[tuple[str, int, str, bytes]], n: int, name: str) -> dict[str, Any]:
    """One ingest measurement on a fresh broker: `msgs` (carrying `n` readings) published with nobody
    subscribed (the reference), then the same messages into `edgewatch run` until all n are accepted
    or nothing moved for 15 s. Rates are in readings/s."""
    broker = _Broker(tmp)
    try:
        c = _publisher(broker.port, f"bench-pub-alone-{name}")
        pub_alone = n / _publish_all(c, msgs)  # nobody subscribed: the publisher + broker alone
        c.loop_stop()
        c.disconnect()
        with _agent(tmp, broker, name) as (_proc, mport):
            c = _publisher(broker.port, f"bench-pub-{name}")
            t0 = time.perf_counter()
            _publish_all(c, msgs)
            last, last_change, t_done = -1.0, time.perf_counter(), None
            while time.perf_counter() - last_change < 15:
                got = _metric_sum(mport, "edgewatch_readings_accepted_total")
                if got != last:
                    last, last_change = got, time.perf_counter()
                if got >= n:
                    t_done = time.perf_counter()
                    break
                time.sleep(0.05)
            rejected = _metric_sum(mport, "edgewatch_readings_rejected_total")
            c.loop_stop()
            c.disconnect()
    finally:
        broker.stop()
    accepted = int(last)
    elapsed = (t_done or last_change) - t0
    return {
        "rate": accepted / elapsed,
        "pub_alone": pub_alone,
        "accepted": accepted,
        "rejected": int(rejected),
    }


INGEST_BATCH = 10  # readings per batch payload in the second ingest row


def bench_ingest(quick: bool, tmp: Path) -> list[Row]:
    """Sustained ingest with zero loss: N readings published at QoS 1 as fast as possible, one reading
    per message, then the same readings in batch payloads of INGEST_BATCH (each on its own broker and
    agent, so the second run inherits no session, queue or stored readings from the first)."""
    secs = 300 if quick else 10_000
    recs = _record(tmp / "ingest.csv", "--devices", "10", "--duration", str(secs), "--scenario", "normal")
    start_ms = int((time.time() - secs - 60) * 1000)
    msgs = _payloads(recs, start_ms)
    n = len(msgs)
    single = _ingest_once(tmp, msgs, n, "ingest")
    batches = _payloads(recs, start_ms, INGEST_BATCH)
    batched = _ingest_once(tmp, batches, n, "ingest-batch")
    return [
        _ingest_row(
            single,
            n,
            f"MQTT ingest through mosquitto, {n:,} readings (10 devices, QoS 1), sustained",
            "paho publisher alone (same messages, QoS 1, 100 in flight)",
            "windows scored as the default config does (cheap screen on)",
        ),
        _ingest_row(
            batched,
            n,
            f"MQTT ingest through mosquitto, {n:,} readings in batch payloads of {INGEST_BATCH} "
            "(10 devices, QoS 1), sustained",
            "paho publisher alone (same batch messages, QoS 1, 100 in flight)",
            "same readings as the row above",
            f"{len(batches):,} messages; ",
        ),
    ]


def _ingest_row(res: dict[str, Any], n: int, figure: str, reference: str, tail: str, head: str = "") -> Row:
    """A row of `bench_ingest` from one `_ingest_once` result (n readings published)."""
    return Row(
        "live",
        figure,
        res["rate"],
        "readings/s",
        reference=reference,
        ref_value=res["pub_alone"],
        ratio=res["rate"] / res["pub_alone"],
        goal=">= 20k readings/s, zero loss",
        met=res["rate"] >= 20_000 and res["accepted"] == n,
        note=f"{head}accepted {res['accepted']:,} of {n:,}, rejected {res['rejected']}; {tail}",
    )


def bench_latency(quick: bool, tmp: Path) -> list[Row]:
    """Reading published -> its alert received by a subscriber (after the broker acked it to the agent)."""
    import paho.mqtt.client as mqtt

    from agent.recording import Recording

    devices, secs, speed = DEVICES_SECS_SPEED
    recs: list[Recording] = []
    for d in range(devices):
        (r,) = _record(
            tmp / f"lat{d}.csv",
            "--devices", "1", "--duration", str(secs), "--scenario", "bearing_wear",
            "--fault-after", "900", "--degradation", "1800", "--seed", str(d),
        )  # fmt: skip
        r.device = f"pump-{d + 1:02d}"
        recs.append(r)
    start_ms = int((time.time() - secs - 30) * 1000) // 1000 * 1000
    msgs = _payloads(recs, start_ms)
    sent: dict[str, list[tuple[int, float]]] = {}
    alerts: list[tuple[str, float, float]] = []
    broker = _Broker(tmp)
    try:
        with _agent(tmp, broker, "latency"):
            sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub")
            lock = threading.Lock()

            def on_message(c: Any, u: Any, m: Any) -> None:
                p = json.loads(m.payload)
                if p.get("state") == "open" and "opened_ts" in p:
                    with lock:
                        alerts.append((p["device"], float(p["opened_ts"]), time.perf_counter()))

            sub.on_message = on_message
            sub.connect("127.0.0.1", broker.port)
            sub.subscribe("edgewatch/gw-bench/+/alert", qos=1)
            sub.loop_start()
            time.sleep(0.3)
            c = _publisher(broker.port, "bench-pub-lat")
            t_wall0, t_data0 = time.perf_counter(), msgs[0][1]
            for dev, ts_ms, topic, payload in msgs:
                wait = (ts_ms - t_data0) / 1000 / speed - (time.perf_counter() - t_wall0)
                if wait > 0:
                    time.sleep(wait)
                c.publish(topic, payload, qos=1)
                sent.setdefault(dev, []).append((ts_ms, time.perf_counter()))
            time.sleep(2)
            sub.loop_stop()
            c.loop_stop()
    finally:
        broker.stop()
    lat = []
    import bisect

    for dev, opened, t_recv in alerts:
        pubs = sent.get(dev, [])
        i = bisect.bisect_left(pubs, (round(opened * 1000), -1.0))
        if i < len(pubs):
            lat.append((t_recv - pubs[i][1]) * 1e3)
    if not lat:
        return [Row("live", "reading -> alert at a subscriber", None, "ms", note="no alert opened")]
    p99 = _pct(lat, 99)
    return [
        Row(
            "live",
            f"reading published -> alert received (via broker), p50; {devices} devices at {speed:.0f}x data time",
            _pct(lat, 50),
            "ms",
            goal="p99 <= 50 ms",
            met=p99 <= 50,
            note=f"p99 {p99:.1f} ms over {len(lat)} alerts (the agent's QoS 1 PUBACK comes before the "
            "subscriber's copy, so this is an upper bound)",
        )
    ]


def _proc_rss_mb(pid: int) -> tuple[float, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _steady_once(
    tmp: Path, msgs: list[tuple[str, int, str, bytes]], settle: float, name: str
) -> dict[str, Any]:
    """`edgewatch run` on a fresh broker fed `msgs` at their data time (live pace): CPU from `settle`
    s after the first message to the last, RSS at the end, and whether torch is mapped."""
    broker = _Broker(tmp)
    try:
        with _agent(tmp, broker, name) as (proc, mport):
            c = _publisher(broker.port, f"bench-pub-{name}")
            t_wall0 = time.time()
            cpu0: float | None = None
            t_cpu0 = 0.0
            for _dev, ts_ms, topic, payload in msgs:
                wait = ts_ms / 1000 - time.time()
                if wait > 0:
                    time.sleep(wait)
                if cpu0 is None and time.time() - t_wall0 > settle:  # past start-up and the first windows
                    cpu0, t_cpu0 = _cpu_s(proc.pid), time.monotonic()
                c.publish(topic, payload, qos=1)
            cpu1, t_cpu1 = _cpu_s(proc.pid), time.monotonic()
            rss, hwm = _proc_rss_mb(proc.pid)
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            accepted = _metric_sum(mport, "edgewatch_readings_accepted_total")
            c.loop_stop()
            c.disconnect()
    finally:
        broker.stop()
    return {
        "cpu_pct": 100 * (cpu1 - (cpu0 or 0.0)) / max(t_cpu1 - t_cpu0, 1e-9),
        "seconds": t_cpu1 - t_cpu0,
        "rss": rss,
        "hwm": hwm,
        "torch": "torch" in maps,
        "accepted": int(accepted),
    }


def bench_steady(quick: bool, tmp: Path) -> list[Row]:
    """`edgewatch run` with 10 devices x 10 Hz live: CPU over the run and RSS at its end; then the same
    readings sent as firmware that batches a second of samples per message (CPU only)."""
    secs, settle = (6, 2) if quick else (60, 5)
    recs = _record(tmp / "steady.csv", "--devices", "10", "--rate", "10", "--duration", str(secs + settle),
                   "--scenario", "normal")  # fmt: skip
    ref = subprocess.run(
        [sys.executable, "-c", "import numpy, onnxruntime, re; "
         "print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    ref_mb = int(ref.stdout.strip()) / 1024
    start_ms = int(time.time() * 1000) + 500
    one = _steady_once(tmp, _payloads(recs, start_ms), settle, "steady")
    start_ms = int(time.time() * 1000) + 500
    per_s = _steady_once(tmp, _payloads(recs, start_ms, 10), settle, "steady-batch")
    return [
        Row(
            "live",
            "agent RSS in steady state (`edgewatch run`, 10 devices x 10 Hz)",
            one["rss"],
            "MB",
            reference="python + numpy + onnxruntime alone",
            ref_value=ref_mb,
            ratio=one["rss"] / ref_mb,
            goal="<= 75 MB; torch never imported",
            met=one["rss"] <= 75 and not one["torch"],
            note=f"peak (VmHWM) {one['hwm']:.1f} MB; torch in memory maps: {'YES' if one['torch'] else 'no'}",
        ),
        Row(
            "live",
            f"agent CPU at 10 devices x 10 Hz, one reading per message, {one['seconds']:.0f} s measured",
            one["cpu_pct"],
            "% of one core",
            goal="<= 1 %",
            met=one["cpu_pct"] <= 1.0,
            note=f"{one['accepted']:,} readings accepted; first {settle} s (start-up) excluded",
        ),
        Row(
            "live",
            f"agent CPU at 10 devices x 10 Hz, batch payloads of 10 (1 message per device per second), "
            f"{per_s['seconds']:.0f} s measured",
            per_s["cpu_pct"],
            "% of one core",
            goal="<= 1 %",
            met=per_s["cpu_pct"] <= 1.0,
            note=f"{per_s['accepted']:,} readings accepted; same readings as the row above; RSS at the end "
            f"{per_s['rss']:.1f} MB",
        ),
    ]


# -- install size --------------------------------------------------------------------------------
def _closure(extras: tuple[str, ...]) -> dict[str, int]:
    """Installed bytes of edgewatch's dependency closure (with `extras`), per distribution."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, int] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [("edgewatch", extras)]
    while todo:
        name, ex = todo.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        size = 0
        for f in dist.files or []:
            with suppress(OSError):
                size += f.locate().stat().st_size
        seen[key] = size
        for spec in dist.requires or []:
            req = Requirement(spec)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                todo.append((req.name, tuple(req.extras)))
    return seen


def bench_install() -> list[Row]:
    gw = _closure(())
    full = _closure(("train",))
    gw_mb, full_mb = sum(gw.values()) / 1e6, sum(full.values()) / 1e6
    top = sorted(gw.items(), key=lambda kv: -kv[1])[:3]
    return [
        Row(
            "install",
            "gateway install (no `train` extra): installed size of the dependency closure",
            gw_mb,
            "MB",
            reference="with the `train` extra",
            ref_value=full_mb,
            ratio=gw_mb / full_mb,
            goal="report both",
            note=f"{len(gw)} vs {len(full)} distributions; largest: "
            + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in top),
        )
    ]


# -- report --------------------------------------------------------------------------------------
def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def render_markdown(rep: BenchReport, notes: str = "") -> str:
    """docs/benchmarks.md: machine, versions, one table, skipped rows, then hand-written notes."""
    m = rep.machine
    vers = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`edgewatch bench`); reproduce with the same command. "
        f"Run {rep.started}, {rep.seconds:.0f} s{' (--quick)' if rep.quick else ''}.",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('mem_gib')} GiB, {m.get('os')}.  ",
        f"Versions: {vers}.",
        "",
        "These figures are from an x86-64 machine; an ARM gateway (a Raspberry Pi 4's Cortex-A72, say) will "
        "be slower, several times so for the model and the Python stages: compare the ratios to the "
        "references of the same run, and re-run `make bench` on the target to get its own figures.",
        "",
        "| section | figure | value | unit | reference (same run) | reference value | ratio | goal | met | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep.rows:
        met = "—" if r.met is None else ("yes" if r.met else "**no**")
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(
            f"| {r.section} | {r.figure} | {_fmt(r.value)} | {r.unit} | {r.reference or '—'} | "
            f"{_fmt(r.ref_value)} | {ratio} | {r.goal or '—'} | {met} | {r.note} |"
        )
    if rep.skipped:
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in rep.skipped]
    if notes:
        lines += ["", notes.rstrip()]
    return "\n".join(lines) + "\n"


NOTES_MARKER = "<!-- notes below are kept when the bench rewrites this file -->"


def _kept_notes(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError:
        return ""
    i = text.find(NOTES_MARKER)
    return text[i:] if i >= 0 else ""


SECTIONS = ("model", "replay", "skab", "install", "ingest", "steady", "latency")
QUICK_SKIPPED = {
    "skab": "SKAB replay: skipped in --quick (trains a model)",
    "latency": "alert latency: skipped in --quick (needs ~30 s of paced fault data)",
}


def run_bench(
    quick: bool = False,
    json_path: Path | None = None,
    md_path: Path | None = None,
    skab: Path = SKAB_DIR,
    only: tuple[str, ...] = (),
) -> BenchReport:
    """Run every section (quick: small sizes, slow rows skipped), write markdown and JSON.

    `only` runs just the named sections (in their usual order), e.g. to re-measure one figure after a
    fix without the ~6 minutes of the whole run; a section named there runs even in quick mode."""
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    t0 = time.perf_counter()
    rep = BenchReport(quick=quick, started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    rep.machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="edgewatch-bench-") as d:
        tmp = Path(d)
        every: dict[str, Callable[[], list[Row]]] = {
            "model": lambda: bench_model(quick, 1 if quick else 3),
            "replay": lambda: bench_replay(quick, tmp),
            "skab": lambda: _skab_rows(rep, tmp, skab),
            "install": bench_install,
            "ingest": lambda: bench_ingest(quick, tmp),
            "steady": lambda: bench_steady(quick, tmp),
            "latency": lambda: bench_latency(quick, tmp),
        }
        sections: list[tuple[str, Callable[[], list[Row]]]] = []
        for name in SECTIONS:
            if only and name not in only:
                continue
            if quick and not only and name in QUICK_SKIPPED:
                rep.skipped.append(QUICK_SKIPPED[name])
                continue
            sections.append((name, every[name]))
        for name, fn in sections:
            ts = time.perf_counter()
            try:
                rep.rows += fn()
            except Exception as exc:  # one failing section must not lose the others' numbers
                rep.skipped.append(f"{name}: failed: {type(exc).__name__}: {exc}"[:300])
            print(f"bench: {name} done in {time.perf_counter() - ts:.1f} s", file=sys.stderr)
    rep.seconds = time.perf_counter() - t0
    if json_path is not None:
        json_path.write_text(json.dumps(asdict(rep), indent=2) + "\n")
    if md_path is not None:
        md_path.write_text(render_markdown(rep, _kept_notes(md_path)))
    return rep


def _skab_rows(rep: BenchReport, tmp: Path, data: Path) -> list[Row]:
    rows, skipped = bench_skab(False, tmp, data)
    rep.skipped += skipped
    return rows


def run_bench_cli(args: Any) -> int:
    """`edgewatch bench`: print the table; `--json`, `--out` (markdown) as asked."""
    md = Path(args.out) if args.out else None
    only = tuple(s.strip() for s in (args.only or "").split(",") if s.strip())
    if only and md is not None:
        print("edgewatch bench: --only and --out do not go together (the report would lose the other rows)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        rep = run_bench(
            quick=args.quick,
            json_path=Path(args.json) if args.json else None,
            md_path=md,
            skab=Path(args.skab),
            only=only,
        )
    except ValueError as exc:
        print(f"edgewatch bench: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(rep))
    return 0
