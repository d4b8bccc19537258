"""Bundle loading: a good bundle verifies; every kind of damage is refused with a message naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.bundle import (
    MANIFEST_NAME,
    MANIFEST_SHA_NAME,
    BundleError,
    Manifest,
    finalize_bundle,
    load_bundle,
    write_bundle,
)

pytest.importorskip("torch")
from training.synth import tiny_bundle


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("b") / "tiny", window=16)


@pytest.fixture
def bundle_dir(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(pristine, dst)
    return dst


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def _write_manifest(d: Path, data: dict) -> None:
    (d / MANIFEST_NAME).write_text(json.dumps(data))


def test_good_bundle_loads_and_verifies(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    m = b.manifest
    assert m.channel_names == ["temperature", "vibration", "pressure"]
    assert m.window == 16 and set(m.files) == {"model.onnx", "model.fp32.onnx"}
    assert b.model_id.startswith("bundle-") and len(b.model_id) == len("bundle-") + 12
    assert b.session.get_inputs()[0].shape[1:] == [16, 3]
    assert load_bundle(bundle_dir).model_id == b.model_id  # stable


def test_an_edited_manifest_is_refused_and_a_refinalized_one_is_a_new_model(bundle_dir: Path) -> None:
    before = load_bundle(bundle_dir).model_id
    data = _manifest(bundle_dir)
    data["stride"] = 8
    _write_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match=r"manifest\.json was modified after the bundle was finalized"):
        load_bundle(bundle_dir)
    finalize_bundle(bundle_dir, Manifest.model_validate(data))
    assert load_bundle(bundle_dir).model_id != before
    (bundle_dir / MANIFEST_SHA_NAME).unlink()
    with pytest.raises(BundleError, match=r"manifest\.sha256: missing"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", ["model.onnx", "model.fp32.onnx"])
def test_tampered_file_is_refused(bundle_dir: Path, name: str) -> None:
    p = bundle_dir / name
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=rf"{name}: sha256 mismatch"):
        load_bundle(bundle_dir)


def test_truncated_model_is_refused(bundle_dir: Path) -> None:
    p = bundle_dir / "model.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch.*1000 bytes.*truncated"):
        load_bundle(bundle_dir)


def test_missing_file_and_missing_manifest_are_refused(bundle_dir: Path) -> None:
    (bundle_dir / "model.fp32.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.fp32\.onnx: listed in the manifest but missing"):
        load_bundle(bundle_dir)
    (bundle_dir / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(bundle_dir)


def test_truncated_manifest_is_refused(bundle_dir: Path) -> None:
    p = bundle_dir / MANIFEST_NAME
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        load_bundle(bundle_dir)


def test_non_onnx_model_with_matching_hash_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "model.onnx").write_text("this is not an onnx model\n")
    finalize_bundle(bundle_dir, Manifest.model_validate(_manifest(bundle_dir)))  # hashes now match
    with pytest.raises(BundleError, match=r"model\.onnx: not a loadable ONNX model"):
        load_bundle(bundle_dir)


def test_wrong_channel_count_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    # a real 4-channel model under a 3-channel manifest
    other = tiny_bundle(tmp_path / "four", window=16, n_channels=4)
    shutil.copy(other / "model.onnx", bundle_dir / "model.onnx")
    finalize_bundle(bundle_dir, Manifest.model_validate(_manifest(bundle_dir)))
    with pytest.raises(
        BundleError, match=r"model\.onnx: wrong channel count: model input has 4 channels, manifest lists 3"
    ):
        load_bundle(bundle_dir)


def test_inconsistent_manifest_channel_layout_is_refused(bundle_dir: Path) -> None:
    data = _manifest(bundle_dir)
    data["scaler"]["center"] = data["scaler"]["center"][:2]
    _write_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match=r"scaler"):
        load_bundle(bundle_dir)
    data = _manifest(bundle_dir)
    data["scaler"]["center"] = [0.0, 0.0, 0.0]
    data["channels"][1]["name"] = "temperature"
    _write_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match=r"duplicate channel names"):
        load_bundle(bundle_dir)


def test_wrong_window_is_refused(bundle_dir: Path) -> None:
    data = _manifest(bundle_dir)
    data["window"] = 32
    _write_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match=r"window is 16, manifest says 32"):
        load_bundle(bundle_dir)


def test_unknown_format_version_and_escaping_paths_are_refused(bundle_dir: Path) -> None:
    data = _manifest(bundle_dir)
    _write_manifest(bundle_dir, {**data, "format_version": 99})
    with pytest.raises(BundleError, match=r"format_version 99 is not supported"):
        load_bundle(bundle_dir)
    _write_manifest(bundle_dir, {**data, "files": {**data["files"], "../secret": "0" * 64}})
    with pytest.raises(BundleError, match=r"refusing file entry '\.\./secret'"):
        load_bundle(bundle_dir)


def test_finalize_refuses_without_model(tmp_path: Path, pristine: Path) -> None:
    m = Manifest.model_validate(_manifest(pristine))
    with pytest.raises(BundleError, match=r"model file missing"):
        finalize_bundle(tmp_path, m)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_write_bundle_writes_files_then_manifest(pristine: Path, tmp_path: Path) -> None:
    m = Manifest.model_validate(_manifest(pristine))
    out = tmp_path / "written"
    files = {"model.onnx": (pristine / "model.onnx").read_bytes(), "notes/readme.txt": b"hello\n"}
    written = write_bundle(out, m, files)
    assert set(written.files) == {"model.onnx", "notes/readme.txt"}
    b = load_bundle(out)
    assert b.manifest.files == written.files and b.model_id.startswith("written-")
