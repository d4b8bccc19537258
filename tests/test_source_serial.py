"""SerialSource on real ptys: line framing, the 256-byte cap, and an adapter unplugged and plugged back.

The port is opened through a symlink, the way /dev/serial/by-id/... points at a USB adapter's tty:
when the adapter comes back it gets a new tty and the link is re-pointed.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from pathlib import Path

import pytest
from conftest import Collector

from agent.parse import parse
from agent.source import SerialSource, SerialSourceConfig, Source
from agent.types import RawMessage, Reading, Reject


def ew1(seq: int) -> bytes:
    body = f"EW1,pump-01,{seq},{1764806400000 + seq * 1000},41.27,2.315,3.204"
    return f"{body}*{zlib.crc32(body.encode()):08X}\n".encode()


class Pty:
    """A pty pair whose slave is reachable through `link` (re-pointed by `replug`)."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master, self.slave = os.openpty()
        tmp = link.with_suffix(".new")
        tmp.symlink_to(os.ttyname(self.slave))
        os.replace(tmp, link)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def unplug(self) -> None:
        os.close(self.master)
        os.close(self.slave)
        self.link.unlink(missing_ok=True)


def wait_until(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture
def pty_source(tmp_path: Path):
    link = tmp_path / "usb-FTDI_FT232R-if00-port0"
    pty = Pty(link)
    cfg = SerialSourceConfig(
        type="serial", port=str(link), read_timeout_s=0.1, reopen_min_s=0.05, reopen_max_s=0.2
    )
    src = SerialSource(cfg)
    got = Collector()
    src.start(got)
    wait_until(lambda: src.connected)
    yield pty, src, got
    src.stop()
    with contextlib.suppress(OSError):
        pty.unplug()


@pytest.mark.timeout(30)
def test_lines_arrive_whole_even_when_split_across_reads(pty_source) -> None:
    pty, src, got = pty_source
    assert isinstance(src, Source)
    assert src.name.startswith("serial:")
    pty.write(ew1(1) + ew1(2))
    half = ew1(3)
    pty.write(half[:20])
    time.sleep(0.3)  # longer than the read timeout: the reader must keep the partial line
    pty.write(half[20:])
    msgs = got.wait_for(3)
    assert [m.payload for m in msgs] == [ew1(1), ew1(2), ew1(3)]
    assert all(m.kind == "serial" and m.origin == str(pty.link) for m in msgs)
    assert all(isinstance(parse(m), Reading) for m in msgs)


@pytest.mark.timeout(30)
def test_overlong_line_is_capped_and_the_next_line_survives(pty_source) -> None:
    pty, _, got = pty_source
    pty.write(b"G" * 700 + b"\n" + ew1(7))
    msgs = got.wait_for(2)
    assert len(msgs[0].payload) == 256
    r = parse(msgs[0])
    assert isinstance(r, Reject) and r.reason == "too_long"
    assert msgs[1].payload == ew1(7)
    time.sleep(0.2)
    assert len(got.items) == 2  # the tail of the long line was skipped, not handed on


@pytest.mark.timeout(30)
def test_survives_adapter_unplug_and_replug(pty_source, tmp_path: Path) -> None:
    pty, src, got = pty_source
    pty.write(ew1(1))
    got.wait_for(1)
    pty.unplug()
    wait_until(lambda: not src.connected)
    time.sleep(0.5)  # several failed reopen attempts while the link is gone
    assert src.opens == 1
    pty2 = Pty(pty.link)  # the adapter is back, as a new tty behind the same link
    try:
        wait_until(lambda: src.connected)
        pty2.write(ew1(2))
        msgs = got.wait_for(2)
        assert msgs[-1].payload == ew1(2)
        assert src.opens == 2
    finally:
        src.stop()
        pty2.unplug()


@pytest.mark.timeout(30)
def test_port_missing_at_start_is_retried(tmp_path: Path) -> None:
    link = tmp_path / "ttyLATE"
    src = SerialSource(
        SerialSourceConfig(type="serial", port=str(link), read_timeout_s=0.1, reopen_min_s=0.05)
    )
    got = Collector()
    src.start(got)
    time.sleep(0.3)
    assert not src.connected
    pty = Pty(link)
    try:
        wait_until(lambda: src.connected)
        pty.write(ew1(5))
        assert got.wait_for(1)[0].payload == ew1(5)
    finally:
        src.stop()
        pty.unplug()


@pytest.mark.timeout(30)
def test_a_failing_sink_does_not_kill_the_reader(tmp_path: Path) -> None:
    link = tmp_path / "ttyFLAKY"
    pty = Pty(link)
    src = SerialSource(
        SerialSourceConfig(type="serial", port=str(link), read_timeout_s=0.1, reopen_min_s=0.05)
    )
    got = Collector()

    def sink(msg: RawMessage) -> None:
        if b",1," in msg.payload:
            raise RuntimeError("bug downstream")
        got(msg)

    src.start(sink)
    try:
        wait_until(lambda: src.connected)
        pty.write(ew1(1))
        wait_until(lambda: src.opens == 2)  # reopened after the error
        pty.write(ew1(2))
        assert got.wait_for(1)[0].payload == ew1(2)
    finally:
        src.stop()
        pty.unplug()
