"""Shared fixtures: real SQLite files and a real mosquitto broker per test that needs one."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.db import open_db
from agent.types import RawMessage


class Collector:
    """A source sink for tests: collects RawMessages and lets a test wait for n of them."""

    def __init__(self) -> None:
        self.items: list[RawMessage] = []
        self.cond = threading.Condition()

    def __call__(self, msg: RawMessage) -> None:
        with self.cond:
            self.items.append(msg)
            self.cond.notify_all()

    def many(self, msgs: list[RawMessage]) -> None:
        """The batch sink (`sink_many`): a source's whole network read in one call."""
        with self.cond:
            self.batches = getattr(self, "batches", 0) + 1
            self.items.extend(msgs)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[RawMessage]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), f"got {len(self.items)} of {n}"
            return list(self.items)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    """A mosquitto process listening on 127.0.0.1:port, which a test may stop and start again."""

    port: int
    conf: Path
    log: Path
    proc: subprocess.Popen | None = None

    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log.read_text()}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def make_broker(tmp_path: Path, extra_conf: str = "", port: int | None = None) -> Broker:
    port = port or free_port()
    conf = tmp_path / f"mosquitto-{port}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_queued_messages 100000\n{extra_conf}"
    )
    return Broker(port=port, conf=conf, log=tmp_path / f"mosquitto-{port}.log")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh mosquitto on a free port, stopped after the test."""
    b = make_broker(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "edgewatch.db"


@pytest.fixture
def fresh_db(db_path: Path):
    db = open_db(db_path)
    yield db
    db.conn.close()


def write_agent_config(
    tmp_path: Path, gateway: str, model: Path, model_keys: str = "", rest: str = ""
) -> Path:
    """`ew.toml` for an Agent built in-process with `sources=[]`: a placeholder serial source that is
    never opened, state in tmp_path/state, the bundle in `model`; `model_keys` go under [model],
    `rest` (further sections) after it."""
    cfg = tmp_path / "ew.toml"
    cfg.write_text(
        f"""
[gateway]
id = "{gateway}"
state_dir = "{tmp_path / "state"}"
[[sources]]
type = "serial"
name = "bus"
port = "/dev/null-not-opened"
[model]
path = "{model}"
{model_keys}
{rest}"""
    )
    return cfg
