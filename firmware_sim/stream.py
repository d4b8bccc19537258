"""Paced live emission of the simulation: serial (a real port or a pty) or MQTT.

The numbers come from the same block generator as `record`, so a stream and a recording with the same
seed, scenario and start carry identical values. Several devices share one output, interleaved per
sample like sensors on an RS-485 bus. Pacing: sample k of every device is due at
wall0 + k / (rate * speed); everything due is sent in one write, so high speeds stay cheap.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator
from typing import TypeVar

from firmware_sim.config import SimConfig
from firmware_sim.pump import WIRE_DROPOUT, WIRE_GARBAGE, Chunk, fleet
from firmware_sim.scenario import Scenario
from firmware_sim.wire import (
    WireRow,
    encode_json,
    encode_json_batch,
    encode_line,
    garbage_line,
    garbage_payload,
    garbage_rng,
)

T = TypeVar("T")
MAX_SIM_BATCH = 500  # readings per batch payload: 500 of ours stay well below the 64 KiB cap


def _wire_rows(chunk: Chunk) -> Iterator[tuple[int, int, float, float, float, int]]:
    """(seq, ts_ms, temperature, vibration, pressure, wire state) of each reading of a chunk."""
    return zip(
        chunk.seq.tolist(),
        chunk.ts_ms.tolist(),
        chunk.temperature.tolist(),
        chunk.vibration.tolist(),
        chunk.pressure.tolist(),
        chunk.wire.tolist(),
        strict=True,
    )


def line_payloads(chunk: Chunk, seed: int, device: int) -> list[bytes | None]:
    """Serial lines of a chunk: None for dropout (silence), corrupted bytes for garbage."""
    out: list[bytes | None] = []
    for seq, ts, t, v, p, w in _wire_rows(chunk):
        if w == WIRE_DROPOUT:
            out.append(None)
            continue
        line = encode_line(chunk.device, seq, ts, t, v, p)
        out.append(garbage_line(garbage_rng(seed, device, seq), line) if w == WIRE_GARBAGE else line)
    return out


def json_rows(chunk: Chunk, seed: int, device: int) -> list[WireRow | bytes | None]:
    """A chunk's readings for MQTT (`group_payloads` encodes them, singly or in batches): a row per
    reading, None for dropout, and for garbage the corrupted single-form payload, as bytes (it always
    travels alone: it is not a reading)."""
    out: list[WireRow | bytes | None] = []
    for seq, ts, t, v, p, w in _wire_rows(chunk):
        if w == WIRE_DROPOUT:
            out.append(None)
        elif w == WIRE_GARBAGE:
            valid = encode_json(chunk.device, seq, ts, t, v, p)
            out.append(garbage_payload(garbage_rng(seed, device, seq), valid))
        else:
            out.append((seq, ts, t, v, p))
    return out


def group_payloads(tick: list[tuple[str, WireRow | bytes]], batch: int) -> list[tuple[str, bytes]]:
    """One pacing tick's readings as MQTT payloads (device, bytes).

    batch = 1: one single-form payload per reading, in order (the classic stream). batch > 1: up to
    `batch` consecutive readings of a device per batch payload; whatever is left at the end of the
    tick is sent then, so no reading waits for a later tick. A garbage payload goes out on its own,
    after the device's readings that came before it, so each device's order is kept.
    """
    out: list[tuple[str, bytes]] = []
    pending: dict[str, list[WireRow]] = {}

    def flush(device: str) -> None:
        rows = pending.pop(device, None)
        if rows:
            out.append((device, encode_json_batch(device, rows)))

    for device, item in tick:
        if isinstance(item, bytes):
            flush(device)
            out.append((device, item))
        elif batch == 1:
            out.append((device, encode_json(device, *item)))
        else:
            rows = pending.setdefault(device, [])
            rows.append(item)
            if len(rows) >= batch:
                flush(device)
    for device in list(pending):
        flush(device)
    return out


def paced_batches(
    cfg: SimConfig,
    scenario: Scenario,
    encode: Callable[[Chunk, int, int], list[T | None]],
    stop: threading.Event,
) -> Iterator[list[tuple[str, T]]]:
    """Yield (device, item) batches as they fall due in wall time, until duration or stop."""
    per_wall_second = cfg.rate * cfg.speed
    wall0 = time.monotonic()
    base = 0  # sample index of the current block's first sample
    for group in fleet(cfg.seed, cfg.devices, scenario, cfg.start_ms, cfg.rate, cfg.duration):
        payloads = [encode(c, cfg.seed, d) for d, c in enumerate(group)]
        names = [c.device for c in group]
        n = len(group[0])
        i = 0
        while i < n:
            if stop.is_set():
                return
            due = int((time.monotonic() - wall0) * per_wall_second) + 1 - base
            j = min(n, due)
            if j <= i:
                wait = (base + i) / per_wall_second - (time.monotonic() - wall0)
                stop.wait(min(max(wait, 0.001), 0.2))
                continue
            batch = [
                (names[d], p)
                for k in range(i, j)
                for d in range(len(group))
                if (p := payloads[d][k]) is not None
            ]
            if batch:
                yield batch
            i = j
        base += n


def _install_stop() -> threading.Event:
    """SIGINT/SIGTERM end the stream cleanly (the current batch is finished first)."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _write_all(fd: int, data: bytes, stop: threading.Event) -> bool:
    """Write everything to a non-blocking fd, waiting while the reader is slow; False if stopped."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
        except BlockingIOError:
            if stop.is_set():
                return False
            select.select([], [fd], [], 0.2)
    return True


def _drain(slave: int, stop: threading.Event, timeout: float = 3.0) -> None:
    """Before closing the pty, give a connected reader time to take the last lines (closing the
    master discards whatever is still queued). The kernel moves written bytes to the slave side
    asynchronously, so the queue must read empty twice, some time apart."""
    end = time.monotonic() + timeout
    empty = 0
    while time.monotonic() < end and not stop.is_set() and empty < 2:
        time.sleep(0.05)
        queued = struct.unpack("i", fcntl.ioctl(slave, termios.FIONREAD, b"\0\0\0\0"))[0]
        empty = empty + 1 if queued == 0 else 0


def open_pty() -> tuple[int, int, str]:
    """A raw pty pair: (master fd, slave fd, slave path). The slave stays open here so the port
    exists and keeps its settings while readers come and go."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


def run_serial(cfg: SimConfig, scenario: Scenario, port: str | None, pty: bool) -> int:
    """Stream protocol lines to `port`, or to a new pty whose path is the first stdout line."""
    stop = _install_stop()
    sent = 0
    if pty:
        master, slave, path = open_pty()
        print(f"serial port: {path}", flush=True)
        try:
            for batch in paced_batches(cfg, scenario, line_payloads, stop):
                if not _write_all(master, b"".join(p for _, p in batch), stop):
                    break
                sent += len(batch)
            _drain(slave, stop)
        finally:
            os.close(master)
            os.close(slave)
    else:
        import serial

        try:
            ser = serial.Serial(port, 115200, bytesize=8, parity="N", stopbits=1)
        except serial.SerialException as e:
            print(f"edgewatch sim serial: cannot open {port}: {e}", file=sys.stderr)
            return 1
        print(f"serial port: {port}", flush=True)
        with ser:
            for batch in paced_batches(cfg, scenario, line_payloads, stop):
                ser.write(b"".join(p for _, p in batch))
                sent += len(batch)
            ser.flush()
    print(f"edgewatch sim serial: sent {sent} lines", file=sys.stderr)
    return 0


def _parse_broker(broker: str) -> tuple[str, int]:
    host, sep, port = broker.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"edgewatch sim mqtt: --broker must be HOST:PORT, got {broker!r}")
    return host, int(port)


def run_mqtt(
    cfg: SimConfig,
    scenario: Scenario,
    broker: str,
    prefix: str = "edgewatch/sensors",
    qos: int = 1,
    connect_timeout: float = 30.0,
    batch: int = 1,
) -> int:
    """Publish telemetry JSON to `<prefix>/<device>/telemetry`: one message per reading, or with
    `batch` > 1 up to that many readings of a device per message (see `group_payloads`).

    paho's network thread reconnects by itself after a broker restart; QoS 1 messages published
    meanwhile are queued in memory and delivered after the reconnect.
    """
    import paho.mqtt.client as mqtt

    if not 1 <= batch <= MAX_SIM_BATCH:
        raise ValueError(f"batch must be 1..{MAX_SIM_BATCH}, got {batch}")
    host, port = _parse_broker(broker)
    stop = _install_stop()
    connected = threading.Event()
    closing = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgewatch-sim-{os.getpid()}")
    client.max_inflight_messages_set(100)

    def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if not getattr(rc, "is_failure", False):
            connected.set()
        else:
            print(f"edgewatch sim mqtt: connect refused: {rc}", file=sys.stderr)

    def on_disconnect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        connected.clear()
        if not closing.is_set():
            print(f"edgewatch sim mqtt: disconnected ({rc}), reconnecting", file=sys.stderr)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    client.connect_async(host, port, keepalive=30)
    client.loop_start()
    try:
        deadline = time.monotonic() + connect_timeout
        while not connected.wait(0.2):
            if stop.is_set():
                return 0
            if time.monotonic() > deadline:
                print(f"edgewatch sim mqtt: cannot connect to {host}:{port}", file=sys.stderr)
                return 1
        pending: deque[mqtt.MQTTMessageInfo] = deque()
        sent = readings = 0
        for tick in paced_batches(cfg, scenario, json_rows, stop):
            readings += sum(not isinstance(item, bytes) for _, item in tick)
            for device, payload in group_payloads(tick, batch):
                pending.append(client.publish(f"{prefix}/{device}/telemetry", payload, qos=qos))
                sent += 1
            while pending and pending[0].is_published():
                pending.popleft()
        end = time.monotonic() + 10.0  # let queued messages reach the broker before disconnecting
        while pending and time.monotonic() < end:
            if pending[0].is_published():
                pending.popleft()
            else:
                time.sleep(0.01)
        lost = f", {len(pending)} not confirmed by the broker" if pending else ""
        print(f"edgewatch sim mqtt: published {sent} messages ({readings} readings){lost}", file=sys.stderr)
        return 0
    finally:
        closing.set()
        client.disconnect()
        client.loop_stop()
