"""The service around the pipeline: hot model reload, refusing bad bundles, graceful stop, sd_notify."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import write_agent_config

from agent.bundle import Manifest, finalize_bundle, load_bundle
from agent.config import load_config
from agent.recording import iter_readings, read_recording
from agent.service import Agent, Inbox
from agent.types import Judgement, RawMessage

ROOT = Path(__file__).resolve().parents[1]
EDGEWATCH = str(Path(sys.executable).parent / "edgewatch")


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "normal.csv"
    subprocess.run(
        [
            EDGEWATCH,
            "sim",
            "record",
            "--out",
            str(out),
            "--devices",
            "1",
            "--duration",
            "1800",
            "--seed",
            "3",
        ],
        check=True,
        capture_output=True,
    )
    return out


def make_agent(tmp_path: Path, model: Path) -> Agent:
    cfg = write_agent_config(
        tmp_path,
        "gw-svc",
        model,
        "shadow_windows = 0",
        "[uplink]\nenabled = false\n[metrics]\nenabled = false\n",
    )
    return Agent(load_config(cfg), sources=[])


def feed(agent: Agent, readings: list, seen: list[Judgement]) -> None:
    agent.pipeline._on_judgement = seen.append
    for r in readings:
        agent.pipeline.process_reading(r, now=None)


def test_hot_reload_swaps_a_good_bundle_and_refuses_a_bad_one(tmp_path: Path, recording: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "default", model)
    agent = make_agent(tmp_path, model)
    readings = list(iter_readings(read_recording(recording)))
    third = len(readings) // 3
    seen: list[Judgement] = []
    old_id = agent.bundle.model_id

    feed(agent, readings[:third], seen)
    assert seen and {j.score.model_id for j in seen} == {old_id}

    # A half-copied / tampered bundle: the manifest changes but a file no longer matches its hash.
    good_onnx = (model / "model.onnx").read_bytes()
    (model / "model.onnx").write_bytes(good_onnx[: len(good_onnx) // 2])
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["created_at"] = "2030-01-01T00:00:00Z"
    (model / "manifest.json").write_text(json.dumps(manifest))
    agent.check_model()
    assert agent.bundle.model_id == old_id
    n = len(seen)
    feed(agent, readings[third : 2 * third], seen)
    assert len(seen) > n and {j.score.model_id for j in seen[n:]} == {old_id}, "old model keeps scoring"

    # Now a valid new bundle lands: it is verified and swapped in, and scoring resumes at once.
    (model / "model.onnx").write_bytes(good_onnx)
    m = Manifest.model_validate(json.loads((ROOT / "models" / "default" / "manifest.json").read_text()))
    finalize_bundle(model, m.model_copy(update={"created_at": "2030-01-02T00:00:00Z"}))
    new_id = load_bundle(model).model_id
    assert new_id != old_id
    agent.check_model()
    assert agent.bundle.model_id == new_id
    n = len(seen)
    feed(agent, readings[2 * third : 2 * third + 64], seen)
    assert len(seen) > n, "windows are primed from stored readings, no full-window wait after a swap"
    assert {j.score.model_id for j in seen[n:]} == {new_id}
    agent.shutdown()


def test_a_bundle_copied_manifest_first_is_taken_once_its_model_file_lands(tmp_path: Path) -> None:
    """`cp -r new/. model/` may write manifest.json before model.onnx: refused then, taken later."""
    onnx = pytest.importorskip("onnx")
    model, staged = tmp_path / "model", tmp_path / "staged"
    shutil.copytree(ROOT / "models" / "default", model)
    shutil.copytree(ROOT / "models" / "default", staged)
    proto = onnx.load(str(staged / "model.onnx"))
    proto.doc_string = "retrained"  # other bytes, same graph
    onnx.save(proto, str(staged / "model.onnx"))
    m = Manifest.model_validate(json.loads((staged / "manifest.json").read_text()))
    finalize_bundle(staged, m.model_copy(update={"created_at": "2030-01-03T00:00:00Z"}))
    new_id = load_bundle(staged).model_id

    agent = make_agent(tmp_path, model)
    old_id = agent.bundle.model_id
    assert new_id != old_id
    for name in ("manifest.json", "manifest.sha256"):  # the old model.onnx is still there
        shutil.copy2(staged / name, model / name)
    agent.check_model()
    agent.check_model()
    assert agent.bundle.model_id == old_id, "a manifest that does not match the files is refused"
    shutil.copy2(staged / "model.onnx", model / "model.onnx")
    agent.check_model()
    assert agent.bundle.model_id == load_bundle(model).model_id != old_id, "tried again once a file changed"
    assert agent.bundle.model_id.rsplit("-", 1)[1] == new_id.rsplit("-", 1)[1]  # ids: <dir>-<hash>
    agent.shutdown()


@pytest.mark.parametrize("damage", ["missing", "truncated", "not_onnx"])
def test_run_refuses_to_start_without_a_valid_bundle(tmp_path: Path, damage: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "default", model)
    if damage == "missing":
        (model / "manifest.json").unlink()
    elif damage == "truncated":
        data = (model / "model.onnx").read_bytes()
        (model / "model.onnx").write_bytes(data[:100])
    else:
        (model / "model.onnx").write_text("this is not an ONNX file")
    cfg = tmp_path / "ew.toml"
    cfg.write_text(
        f'[gateway]\nid = "g"\nstate_dir = "{tmp_path / "s"}"\n[[sources]]\ntype = "serial"\nname = "b"\n'
        f'port = "/dev/null"\n[model]\npath = "{model}"\n[metrics]\nenabled = false\n'
    )
    out = subprocess.run([EDGEWATCH, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert "cannot start without a valid model bundle" in out.stderr
    assert str(model) in out.stderr


def test_invalid_config_is_refused_with_the_key_path(tmp_path: Path) -> None:
    cfg = tmp_path / "ew.toml"
    cfg.write_text('[gateway]\nid = "g"\n[[sources]]\ntype = "serial"\nname = "b"\n[model]\npath = "x"\n')
    out = subprocess.run([EDGEWATCH, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "sources[0]" in out.stderr and "port" in out.stderr


def test_sigterm_stops_cleanly_and_notifies_systemd(tmp_path: Path) -> None:
    """READY=1 after start, WATCHDOG=1 from the loop, STOPPING=1 and exit 0 on SIGTERM."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    cfg = tmp_path / "ew.toml"
    cfg.write_text(
        f'[gateway]\nid = "g"\nstate_dir = "{tmp_path / "s"}"\n[[sources]]\ntype = "serial"\nname = "b"\n'
        f'port = "{tmp_path / "no-such-port"}"\n[model]\npath = "{ROOT / "models" / "default"}"\n'
        "[uplink]\nenabled = false\n[metrics]\nenabled = false\n"
    )
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [EDGEWATCH, "run", "--config", str(cfg)], env=env, stderr=subprocess.PIPE, text=True
    )
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(_recv_until(sock, "WATCHDOG=1")), daemon=True)
    reader.start()
    reader.join(40)
    proc.terminate()
    rc = proc.wait(30)
    got += _recv_until(sock, "STOPPING=1")
    sock.close()
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
    assert any(m.startswith("READY=1") for m in got), got
    assert "WATCHDOG=1" in got and "STOPPING=1" in got


def _recv_until(sock: socket.socket, wanted: str) -> list[str]:
    out: list[str] = []
    try:
        while True:
            msg = sock.recv(4096).decode()
            out.append(msg)
            if msg.startswith(wanted):
                return out
    except TimeoutError:
        return out


def test_inbox_is_bounded_by_payload_bytes_and_keeps_order() -> None:
    """A source blocks (back-pressure, nothing dropped) once the waiting payloads reach max_bytes, even
    with few messages (batch payloads are up to 64 KiB); taking everything lets it go on, in order."""
    inbox = Inbox(maxsize=1000, max_bytes=100_000)
    big = [RawMessage(bytes([i]) * 40_000, "mqtt", "t", float(i)) for i in range(3)]
    inbox.put_many(big[:3])  # 120 kB: let in whole (a batch is not split), now over the bound
    assert inbox.nbytes == 120_000
    done = threading.Event()

    def source() -> None:
        inbox.put(RawMessage(b"x", "mqtt", "t", 3.0))
        done.set()

    t = threading.Thread(target=source, daemon=True)
    t.start()
    assert not done.wait(0.3)  # blocked on bytes, though only 3 of 1000 items wait
    first = inbox.take(timeout=0)
    assert done.wait(5)
    rest = inbox.take(timeout=1)
    assert [m.received for m in first + rest] == [0.0, 1.0, 2.0, 3.0]
    assert inbox.nbytes == 0
