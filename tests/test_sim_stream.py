"""Live streaming through real parts: `edgewatch sim serial --pty` read with pyserial, and
`edgewatch sim mqtt` received from a real mosquitto. What arrives must equal what `simulate` computes
for the same seed, scenario and start, i.e. what `record` writes."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import tty
import zlib
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import serial
from conftest import Broker

from firmware_sim.pump import WIRE_GARBAGE, WIRE_OK, simulate
from firmware_sim.scenario import build_scenario
from firmware_sim.wire import encode_json, encode_line

EDGEWATCH = str(Path(sys.executable).with_name("edgewatch"))
START_ISO, START_MS = "2026-12-01T00:00:00Z", 1_796_083_200_000


def expected_lines(seed: int, devices: int, scenario: str, duration: float, fault_after: float, deg: float):
    sc = build_scenario(scenario, devices, duration, fault_after, deg, seed)
    chunks = [simulate(seed, d, sc, START_MS, duration) for d in range(devices)]
    return chunks


def first_stdout_line(proc: subprocess.Popen, timeout: float = 15.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "simulator printed nothing"
    return proc.stdout.readline().decode()


def read_lines(path: str, proc: subprocess.Popen, limit: float) -> list[bytes]:
    """Read lines until the simulator exits and the port runs dry (a closed pty raises)."""
    lines: list[bytes] = []
    end = time.monotonic() + limit
    with serial.Serial(path, 115200, timeout=0.5) as port:
        while time.monotonic() < end:
            try:
                line = port.readline()
            except serial.SerialException:
                break
            if line:
                lines.append(line)
            elif proc.poll() is not None:
                break
    return lines


def valid(line: bytes) -> bool:
    body, _, crc = line.rstrip(b"\n").rpartition(b"*")
    try:
        line.decode("ascii")
    except UnicodeDecodeError:
        return False
    return len(crc) == 8 and zlib.crc32(body) == int(crc, 16)


@pytest.mark.timeout(60)
def test_serial_pty_stream_equals_simulation() -> None:
    seed, devices, duration = 3, 2, 80
    proc = subprocess.Popen(
        [
            *(EDGEWATCH, "sim", "serial", "--pty", "--seed", str(seed), "--devices", str(devices)),
            *("--speed", "40", "--duration", str(duration), "--start", START_ISO),
            *("--scenario", "sensor_garbage", "--fault-after", "20", "--degradation", "40"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        head = first_stdout_line(proc)
        assert head.startswith("serial port: /dev/")
        lines = read_lines(head.split(": ", 1)[1].strip(), proc, limit=30)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    chunks = expected_lines(seed, devices, "sensor_garbage", duration, 20, 40)
    want = {}
    for c in chunks:
        for i in range(len(c)):
            if c.wire[i] == WIRE_OK:
                want[(c.device, int(c.seq[i]))] = encode_line(
                    c.device, c.seq[i], c.ts_ms[i], c.temperature[i], c.vibration[i], c.pressure[i]
                )
    good = [ln for ln in lines if valid(ln)]
    bad = [ln for ln in lines if not valid(ln)]
    got = {}
    for ln in good:
        f = ln.split(b",")
        got[(f[1].decode(), int(f[2]))] = ln
    assert got.items() <= want.items()  # every line received is exactly the simulated one
    # The port opens a moment after the path is printed; from then on nothing is lost.
    late = {k for k in want if k[1] >= 15}
    assert late <= got.keys()
    n_garbage = int((chunks[0].wire == WIRE_GARBAGE).sum())
    assert n_garbage > 5 and len(bad) == n_garbage  # garbage only from pump-01, one line each
    # Devices interleave on the one port in time order, like sensors on an RS-485 bus.
    order = [(int(ln.split(b",")[3]), ln.split(b",")[1]) for ln in good]
    assert order == sorted(order)


@pytest.mark.timeout(60)
def test_serial_stops_cleanly_on_sigterm_and_starts_a_day_back() -> None:
    proc = subprocess.Popen(
        [EDGEWATCH, "sim", "serial", "--pty", "--seed", "1", "--speed", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        path = first_stdout_line(proc).split(": ", 1)[1].strip()
        with serial.Serial(path, 115200, timeout=5) as port:
            port.readline()  # may be partial: the port was opened mid-line
            line = port.readline()
        assert valid(line)
        ts = int(line.split(b",")[3]) / 1000
        assert abs(ts - (time.time() - 86400)) < 120  # speed > 1: a catch-up feed from 24 h ago
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert b"sent" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@contextlib.contextmanager
def telemetry_subscriber(broker: Broker, client_id: str) -> Iterator[list[tuple[str, bytes]]]:
    """A subscriber to every device's telemetry on `broker` (subscription acknowledged), collecting
    (topic, payload) in arrival order."""
    received: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("edgewatch/sensors/+/telemetry", qos=1)
    sub.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    sub.on_message = lambda c, u, m: received.append((m.topic, m.payload))
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    try:
        assert subscribed.wait(10)
        yield received
    finally:
        sub.loop_stop()
        sub.disconnect()


@pytest.mark.timeout(60)
def test_mqtt_stream_reaches_a_real_broker(broker) -> None:
    with telemetry_subscriber(broker, "test-sim-sub") as received:
        seed, devices, duration = 5, 2, 100
        out = subprocess.run(
            [
                *(EDGEWATCH, "sim", "mqtt", "--broker", broker.address, "--seed", str(seed)),
                *(
                    "--devices",
                    str(devices),
                    "--speed",
                    "100",
                    "--duration",
                    str(duration),
                    "--start",
                    START_ISO,
                ),
                *("--scenario", "sensor_dropout", "--fault-after", "20", "--degradation", "10", "--qos", "1"),
            ],
            capture_output=True,
            timeout=40,
        )
        assert out.returncode == 0, out.stderr
        chunks = expected_lines(seed, devices, "sensor_dropout", duration, 20, 10)
        want = {
            (f"edgewatch/sensors/{c.device}/telemetry", int(c.seq[i])): encode_json(
                c.device, c.seq[i], c.ts_ms[i], c.temperature[i], c.vibration[i], c.pressure[i]
            )
            for c in chunks
            for i in range(len(c))
            if c.wire[i] == WIRE_OK
        }
        assert len(want) == devices * duration - 10  # 10 s of dropout on pump-01
        deadline = time.monotonic() + 10
        while len(received) < len(want) and time.monotonic() < deadline:
            time.sleep(0.05)
        got = {(topic, json.loads(p)["seq"]): p for topic, p in received}
        assert len(received) == len(want)
        assert got == want


@pytest.mark.timeout(60)
def test_serial_port_option_writes_to_an_existing_port() -> None:
    """`--port DEV` through pyserial, to a pty the test owns (its master side is our wire)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        proc = subprocess.Popen(
            [
                *(EDGEWATCH, "sim", "serial", "--port", os.ttyname(slave), "--seed", "4", "--devices", "3"),
                *("--speed", "50", "--duration", "30", "--start", START_ISO),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        data = b""
        end = time.monotonic() + 30
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.3)
            if ready:
                data += os.read(master, 65536)
            elif proc.poll() is not None:
                break
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        os.close(master)
        os.close(slave)
    lines = data.splitlines(keepends=True)
    assert len(lines) == 3 * 30 and all(valid(ln) for ln in lines)
    sc = build_scenario("normal", 3, 30)
    c = simulate(4, 2, sc, START_MS, 30)
    want = [
        encode_line(c.device, c.seq[i], c.ts_ms[i], c.temperature[i], c.vibration[i], c.pressure[i])
        for i in range(30)
    ]
    assert [ln for ln in lines if b",pump-03," in ln] == want


@pytest.mark.timeout(60)
def test_mqtt_batch_stream_carries_the_same_readings_in_batch_payloads(broker) -> None:
    """`--batch 10` through a real broker: batch payloads of at most 10 readings of one device whose
    readings are exactly the simulation's (NaN as null), in each device's order; garbage stays garbage."""
    from agent.parse import parse_json_many
    from agent.types import Reading

    with telemetry_subscriber(broker, "test-sim-sub-batch") as received:
        seed, devices, duration, rate = 6, 2, 60, 100  # 10k readings/s of wall time: ticks hold several
        out = subprocess.run(
            [
                *(EDGEWATCH, "sim", "mqtt", "--broker", broker.address, "--seed", str(seed)),
                *("--devices", str(devices), "--rate", str(rate), "--speed", "50"),
                *("--duration", str(duration), "--start", START_ISO, "--scenario", "sensor_garbage"),
                *("--fault-after", "20", "--degradation", "5", "--batch", "10"),
            ],
            capture_output=True,
            timeout=40,
        )
        assert out.returncode == 0, out.stderr
        sc = build_scenario("sensor_garbage", devices, duration, 20, 5, seed)
        chunks = [simulate(seed, d, sc, START_MS, duration, rate) for d in range(devices)]
        want = {
            c.device: [
                json.loads(
                    encode_json(
                        c.device, c.seq[i], c.ts_ms[i], c.temperature[i], c.vibration[i], c.pressure[i]
                    )
                )
                for i in range(len(c))
                if c.wire[i] == WIRE_OK
            ]
            for c in chunks
        }
        n_garbage = sum(int((c.wire == WIRE_GARBAGE).sum()) for c in chunks)
        assert n_garbage > 5
        messages = n_garbage + sum(len(v) for v in want.values())
        deadline = time.monotonic() + 10
        settled = -1
        while time.monotonic() < deadline and len(received) != settled:  # until nothing more arrives
            settled = len(received)
            time.sleep(0.5)
        got: dict[str, list[dict]] = {c.device: [] for c in chunks}
        garbage = 0
        for topic, payload in received:
            device = topic.split("/")[-2]
            items = parse_json_many(payload, topic, 0.0)
            if not all(isinstance(r, Reading) for r in items):
                assert len(items) == 1, items  # a corrupt payload is one message of its own
                garbage += 1
                continue
            doc = json.loads(payload)
            assert set(doc) == {"v", "device", "batch"} and 1 <= len(doc["batch"]) <= 10
            got[device] += [{"v": 1, "device": device, **el} for el in doc["batch"]]
        assert garbage == n_garbage, (len(received), messages, out.stderr)
        assert got == want  # every reading once, in each device's order
        assert len(received) < messages / 2, "readings should have been grouped"


def test_batch_option_is_checked_before_connecting() -> None:
    for bad in ("0", "501", "x"):
        out = subprocess.run(
            [EDGEWATCH, "sim", "mqtt", "--broker", "127.0.0.1:1", "--batch", bad],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2 and "--batch" in out.stderr, out.stderr
