"""The systemd unit (verify, security exposure), its hardening against the real native stack, and the
install/uninstall scripts (syntax, dry run, staging-tree install, idempotence, purge)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edgewatch.service"
INSTALL = REPO / "systemd" / "install.sh"
UNINSTALL = REPO / "systemd" / "uninstall.sh"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


def unit_settings() -> dict[str, list[str]]:
    """Key -> values of the unit (systemd allows repeated keys, so configparser does not fit)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_the_required_settings() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"] and s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["on-failure"]
    assert s["ExecStart"] == ["/opt/edgewatch/venv/bin/edgewatch run --config /etc/edgewatch/edgewatch.toml"]
    assert s["StateDirectory"] == ["edgewatch"] and s["ConfigurationDirectory"] == ["edgewatch"]
    assert s["DynamicUser"] == ["yes"] and s["SupplementaryGroups"] == ["dialout"]
    assert "PrivateDevices" not in s  # it would hide the serial ports
    assert {"char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw"} <= set(s["DeviceAllow"])
    assert s["ProtectSystem"] == ["strict"] and s["MemoryDenyWriteExecute"] == ["yes"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["CapabilityBoundingSet"] == [""]
    assert {v.split(":")[0] for v in s["LoadCredential"]} == {"mqtt-password", "mqtt-tls-key"}


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at one that does, keep everything else.
    true = shutil.which("true")
    assert true is not None
    text = UNIT.read_text().replace("/opt/edgewatch/venv/bin/edgewatch", true)
    unit = tmp_path / "edgewatch.service"
    unit.write_text(text)
    proc = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "edgewatch.service" not in proc.stderr, proc.stderr  # no warnings about our unit


@needs_analyze
def test_security_exposure_is_at_most_2() -> None:
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    m = re.search(r"Overall exposure level for edgewatch\.service: ([0-9.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout


MDWE_PROBE = textwrap.dedent(
    """
    # What MemoryDenyWriteExecute=yes enforces, via the kernel's prctl(PR_SET_MDWE): the native stack
    # the agent loads (numpy, onnxruntime with an fp32 LSTM and an int8 DynamicQuantizeLSTM, sqlite,
    # paho, pyserial) must work with no writable+executable memory.
    import ctypes, mmap, sys, tempfile, os
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print("UNSUPPORTED", ctypes.get_errno()); sys.exit(0)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X mapping allowed: MDWE not in force")
    except PermissionError:
        pass
    import numpy as np, onnx, onnxruntime as ort, sqlite3, paho.mqtt.client, serial
    from onnx import TensorProto, helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    T, I, H = 16, 3, 8
    rng = np.random.default_rng(0)
    W = helper.make_tensor("W", TensorProto.FLOAT, [1, 4 * H, I], rng.normal(size=4 * H * I).astype("f4").tolist())
    R = helper.make_tensor("R", TensorProto.FLOAT, [1, 4 * H, H], rng.normal(size=4 * H * H).astype("f4").tolist())
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=H)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, 1, I])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[W, R])
    d = tempfile.mkdtemp()
    fp32, int8 = os.path.join(d, "m.onnx"), os.path.join(d, "m.int8.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(int8).graph.node}
    x = rng.normal(size=(T, 1, I)).astype("f4")
    for path in (fp32, int8):
        y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert y.shape == (T, 1, 1, H) and np.isfinite(y).all()
    con = sqlite3.connect(os.path.join(d, "t.db")); con.execute("PRAGMA journal_mode=WAL"); con.close()
    print("OK")
    """
)


@pytest.mark.timeout(120)
def test_native_stack_runs_with_memory_deny_write_execute() -> None:
    pytest.importorskip("onnx")
    proc = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=110, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("UNSUPPORTED"):
        pytest.skip(f"kernel {os.uname().release} has no PR_SET_MDWE (needs >= 6.3): {proc.stdout.strip()}")
    assert proc.stdout.strip().splitlines()[-1] == "OK"


def run_script(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL])
def test_scripts_parse(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK)


def test_install_dry_run_prints_the_plan_and_touches_nothing(tmp_path: Path) -> None:
    proc = run_script(INSTALL, "--dry-run", env={"DESTDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"-m venv {tmp_path}/opt/edgewatch/venv" in out
    assert re.search(r"pip install --quiet --upgrade \S+$", out, re.M)  # the gateway install
    assert "[train]" not in out
    assert f"{tmp_path}/etc/edgewatch/credentials" in out
    assert f"{tmp_path}/etc/systemd/system/edgewatch.service" in out
    assert list(tmp_path.iterdir()) == []


def test_install_into_a_staging_tree_is_idempotent_and_uninstall_keeps_data(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {"DESTDIR": str(root), "PREFIX": "/srv/ew", "CONFDIR": "/etc/ew"}
    first = run_script(INSTALL, "--no-venv", env=env)
    assert first.returncode == 0, first.stderr
    unit = (root / "etc/systemd/system/edgewatch.service").read_text()
    assert "ExecStart=/srv/ew/venv/bin/edgewatch run --config /etc/ew/edgewatch.toml" in unit
    assert "LoadCredential=mqtt-password:/etc/ew/credentials/mqtt-password" in unit
    creds = root / "etc/ew/credentials"
    assert oct(creds.stat().st_mode & 0o777) == "0o700"
    assert oct((creds / "mqtt-password").stat().st_mode & 0o777) == "0o600"
    assert (root / "srv/ew/docs").is_dir()

    # A second run keeps what the operator changed.
    config = root / "etc/ew/edgewatch.toml"
    config.write_text("# operator's config\n")
    (creds / "mqtt-password").write_text("s3cret\n")
    second = run_script(INSTALL, "--no-venv", env=env)
    assert second.returncode == 0, second.stderr
    assert config.read_text() == "# operator's config\n"
    assert (creds / "mqtt-password").read_text() == "s3cret\n"
    assert "edgewatch.toml exists: kept" in second.stdout

    state = root / "var/lib/edgewatch"
    state.mkdir(parents=True)
    (state / "edgewatch.db").write_bytes(b"outbox")
    gone = run_script(UNINSTALL, env=env)
    assert gone.returncode == 0, gone.stderr
    assert not (root / "etc/systemd/system/edgewatch.service").exists()
    assert not (root / "srv/ew").exists()
    assert config.exists() and (state / "edgewatch.db").exists()

    purged = run_script(UNINSTALL, "--purge", env=env)
    assert purged.returncode == 0, purged.stderr
    assert not (root / "etc/ew").exists() and not state.exists()


def test_install_refuses_a_model_dir_without_manifest(tmp_path: Path) -> None:
    proc = run_script(INSTALL, "--no-venv", "--model", str(tmp_path), env={"DESTDIR": str(tmp_path / "r")})
    assert proc.returncode == 1
    assert "no manifest.json" in proc.stderr
