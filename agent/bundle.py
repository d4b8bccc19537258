"""Model bundle: the contract between offline training and the gateway.

A bundle is a directory with `model.onnx` (int8), optional extras (fp32 model, report, plots) and
`manifest.json`, written last, which lists every file's sha256 and everything the agent needs to use
the model the way it was trained (channel order, grid, window, scaling, calibrated error quantiles).
Loading verifies all of it up front, so a damaged or mismatched bundle is refused with a message that
names the file and the problem instead of producing silently wrong scores.

Torch-free and onnx-package-free on purpose: a gateway has only onnxruntime.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# sha256 of manifest.json in `sha256sum` format, written after it: the manifest hashes every other file,
# this file hashes the manifest, so an edit of any file of the bundle is refused (`sha256sum -c` works).
MANIFEST_SHA_NAME = "manifest.sha256"


class BundleError(Exception):
    """A bundle that must not be used; the message names the file and what is wrong with it."""


class ChannelSpec(BaseModel):
    """One model input channel, in the order the model expects."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="channel name as in readings (e.g. 'vibration')", min_length=1)
    unit: str = Field(default="", description="physical unit, for humans and alert payloads")


class Scaler(BaseModel):
    """Per-channel affine scaling learnt on training data: x_scaled = (x - center) / scale."""

    model_config = ConfigDict(extra="forbid")
    center: list[float] = Field(description="per-channel center (training mean), channel order")
    scale: list[float] = Field(description="per-channel scale (training std, floored), channel order")

    @model_validator(mode="after")
    def _positive(self) -> Scaler:
        if len(self.center) != len(self.scale):
            raise ValueError(f"scaler center has {len(self.center)} entries but scale {len(self.scale)}")
        if any(not s > 0 for s in self.scale):
            raise ValueError("scaler scale must be > 0 for every channel")
        return self


QUANTILE_KEYS: tuple[str, ...] = ("p50", "p90", "p99", "p99.5", "p99.9")


class Calibration(BaseModel):
    """Reconstruction-error distribution on held-out normal windows (what 'normal' looks like)."""

    model_config = ConfigDict(extra="forbid")
    quantiles: dict[str, float] = Field(
        description="window-error quantiles keyed 'p50', 'p90', 'p99', 'p99.5', 'p99.9' (p99: default alert)"
    )
    channel_error_mean: list[float] = Field(
        description="per-channel error mean, channel order, for attribution"
    )
    channel_error_std: list[float] = Field(
        description="per-channel error std, channel order, for attribution"
    )
    n_windows: int = Field(description="number of held-out windows behind these figures", ge=1)
    error: str = Field(
        default="mse_time_mean_channels",
        description="error definition: per channel mean squared error over time, total = mean over channels",
    )

    @model_validator(mode="after")
    def _quantiles(self) -> Calibration:
        missing = [k for k in QUANTILE_KEYS if k not in self.quantiles]
        if missing:
            raise ValueError(f"calibration.quantiles lacks {missing}")
        vals = [self.quantiles[k] for k in QUANTILE_KEYS]
        if any(not (v >= 0) for v in vals) or vals != sorted(vals):
            raise ValueError(f"calibration quantiles must be >= 0 and increasing, got {self.quantiles}")
        return self


class DataFile(BaseModel):
    """One input file of the training data, so a bundle can be traced to what it learnt from."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="file name (no directories, to keep paths out of bundles)")
    sha256: str = Field(description="sha256 of the file content")
    rows: int = Field(description="rows read from this file", ge=0)


class TrainingData(BaseModel):
    """Training-data fingerprint."""

    model_config = ConfigDict(extra="forbid")
    files: list[DataFile] = Field(default_factory=list, description="input files with hashes")
    rows_used: int = Field(default=0, description="grid rows used for training + validation", ge=0)
    train_windows: int = Field(default=0, description="training windows", ge=0)
    val_windows: int = Field(default=0, description="validation (calibration) windows", ge=0)
    selection: str = Field(default="", description="how normal rows were chosen")


class Parity(BaseModel):
    """int8 vs fp32 agreement on held-out windows (the quantization gate)."""

    model_config = ConfigDict(extra="forbid")
    spearman: float = Field(description="Spearman rank correlation of window errors, int8 vs fp32")
    decision_agreement: float = Field(description="share of windows with the same alert decision at p99")
    max_rel_error_diff: float = Field(description="largest |int8 - fp32| / fp32 window error")
    n_windows: int = Field(description="windows compared", ge=1)
    threshold: float = Field(description="threshold used for the decision comparison (fp32 p99)")
    n_injected: int = Field(default=0, ge=0, description="of n_windows, how many carry injected anomalies")
    spearman_normal_only: float | None = Field(
        default=None, description="Spearman on the held-out normal windows alone (informational)"
    )
    decision_agreement_normal_only: float | None = Field(
        default=None, description="decision agreement on the held-out normal windows alone (informational)"
    )


class InputStats(BaseModel):
    """Each channel's training distribution, as quantiles, so the agent can tell when inputs drift."""

    model_config = ConfigDict(extra="forbid")
    levels: list[float] = Field(
        description="percent levels of the quantiles, increasing from 0 to 100 (e.g. 0, 5, 10, ..., 100)",
        min_length=3,
    )
    quantiles: list[list[float]] = Field(
        description="per channel (channel order) the training value at each level, physical units"
    )

    @model_validator(mode="after")
    def _shape(self) -> InputStats:
        lv = self.levels
        if lv[0] != 0 or lv[-1] != 100 or any(b <= a for a, b in itertools.pairwise(lv)):
            raise ValueError(f"input_stats.levels must rise from 0 to 100, got {lv}")
        for i, q in enumerate(self.quantiles):
            if len(q) != len(lv):
                raise ValueError(f"input_stats.quantiles[{i}] has {len(q)} values for {len(lv)} levels")
            if not all(math.isfinite(v) for v in q) or any(b < a for a, b in itertools.pairwise(q)):
                raise ValueError(f"input_stats.quantiles[{i}] must be finite and non-decreasing")
        return self


class LatentScore(BaseModel):
    """Window score = Hotelling T2 of the encoder's code instead of the reconstruction error.

    On short training sets (SKAB: 400 rows per file) the code separates faults from normal better than
    the reconstruction error does (docs/results.md). The model then has a second output with the code;
    `mean` and `inv_cov` are fitted on the training windows' codes (ridge-regularised covariance), and the
    calibration quantiles are of this score, so thresholds work unchanged.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["latent_t2"] = Field(default="latent_t2", description="score definition")
    output: str = Field(default="latent", description="name of the model output holding the code [batch, H]")
    mean: list[float] = Field(description="mean code of the training windows, H entries", min_length=1)
    inv_cov: list[list[float]] = Field(description="inverse of the regularised code covariance, H x H")
    ridge: float = Field(
        default=0.0, ge=0, description="ridge added to the covariance (relative), for the record"
    )

    @model_validator(mode="after")
    def _square(self) -> LatentScore:
        h = len(self.mean)
        if len(self.inv_cov) != h or any(len(row) != h for row in self.inv_cov):
            raise ValueError(f"score.inv_cov must be {h} x {h} to match score.mean")
        if not all(math.isfinite(v) for row in self.inv_cov for v in row):
            raise ValueError("score.inv_cov holds a non-finite value")
        return self


class Manifest(BaseModel):
    """Everything the agent needs to know about a model; `files` makes the bundle tamper-evident."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = Field(default=FORMAT_VERSION, description="bundle format version")
    channels: list[ChannelSpec] = Field(description="model input channels, in order", min_length=1)
    window: int = Field(description="window length in samples", ge=2)
    stride: int = Field(description="samples between window starts used in training", ge=1)
    sample_period_s: float = Field(description="grid period in seconds", gt=0)
    max_gap_s: float = Field(description="longest gap bridged by interpolation, seconds", ge=0)
    scaler: Scaler = Field(description="input scaling")
    calibration: Calibration = Field(description="held-out normal error distribution")
    model_file: str = Field(default="model.onnx", description="int8 ONNX model the agent runs")
    architecture: dict[str, Any] = Field(default_factory=dict, description="model shape (hidden, layers)")
    training_data: TrainingData = Field(default_factory=TrainingData, description="data fingerprint")
    training: dict[str, Any] = Field(default_factory=dict, description="training metrics")
    parity: Parity | None = Field(default=None, description="int8 vs fp32 parity figures")
    input_stats: InputStats | None = Field(
        default=None, description="training distribution per channel, for drift checks (None: unknown)"
    )
    score: LatentScore | None = Field(
        default=None,
        description="window score when it is not the reconstruction error (None: reconstruction)",
    )
    created_at: str = Field(
        default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        description="UTC creation time",
    )
    edgewatch_version: str = Field(default="", description="edgewatch version that wrote the bundle")
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256, every file")

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        n = len(self.channels)
        names = self.channel_names
        if len(set(names)) != n:
            raise ValueError(f"duplicate channel names: {names}")
        for what, vec in (
            ("scaler.center", self.scaler.center),
            ("scaler.scale", self.scaler.scale),
            ("calibration.channel_error_mean", self.calibration.channel_error_mean),
            ("calibration.channel_error_std", self.calibration.channel_error_std),
        ):
            if len(vec) != n:
                raise ValueError(f"{what} has {len(vec)} entries but there are {n} channels {names}")
        if self.input_stats is not None and len(self.input_stats.quantiles) != n:
            raise ValueError(
                f"input_stats.quantiles has {len(self.input_stats.quantiles)} channels but there are {n} {names}"
            )
        return self


@dataclass
class Bundle:
    """A verified bundle: its manifest, where it lives, and an onnxruntime session ready to use."""

    path: Path
    manifest: Manifest
    model_id: str
    session: Any = field(repr=False)  # onnxruntime.InferenceSession, built with `threads`
    threads: int = 1

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    def make_session(self, threads: int = 1) -> Any:
        """A new onnxruntime session on the verified model (sequential, `threads` intra-op threads)."""
        return _make_session(self.model_path, threads)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _make_session(model_path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # No CPU arena: it keeps the largest batch's buffers for the process's life (batch 256: +19 MB RSS,
    # measured); the agent scores one window per call, where the arena saves nothing measurable.
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])


_SAFE_REL = re.compile(r"^(?!/)(?!.*(^|/)\.\.(/|$))[^\\\x00]+$")


def _read_manifest(root: Path) -> tuple[Manifest, bytes]:
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory (a bundle is a directory with {MANIFEST_NAME})")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; the bundle is incomplete (manifest.json is written last)")
    raw = mpath.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON (truncated or corrupted?): {e}") from e
    if not isinstance(data, dict):
        raise BundleError(f"{mpath}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: format_version {version!r} is not supported (this edgewatch reads {FORMAT_VERSION})"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise BundleError(f"{mpath}: invalid manifest: {e}") from e
    return manifest, raw


def _verify_files(root: Path, manifest: Manifest) -> None:
    if manifest.model_file not in manifest.files:
        raise BundleError(
            f"{root / MANIFEST_NAME}: model file {manifest.model_file!r} is not listed in 'files'"
        )
    for rel, want in sorted(manifest.files.items()):
        if not _SAFE_REL.match(rel) or rel == MANIFEST_NAME:
            raise BundleError(f"{root / MANIFEST_NAME}: refusing file entry {rel!r} (outside the bundle)")
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p}: listed in the manifest but missing")
        got = sha256_file(p)
        if got != want:
            raise BundleError(
                f"{p}: sha256 mismatch (manifest {want[:12]}..., file {got[:12]}..., "
                f"{p.stat().st_size} bytes): the file was modified or truncated"
            )


def _check_model(path: Path, manifest: Manifest, session: Any) -> None:
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise BundleError(f"{path}: expected 1 input and >= 1 output, got {len(inputs)} and {len(outputs)}")
    n = len(manifest.channels)
    for kind, shape in (("input", inputs[0].shape), ("output", outputs[0].shape)):
        if len(shape) != 3:
            raise BundleError(f"{path}: {kind} has rank {len(shape)}, expected [batch, window, channels]")
        _, t, c = shape
        if isinstance(c, int) and c != n:
            raise BundleError(
                f"{path}: wrong channel count: model {kind} has {c} channels, manifest lists {n} "
                f"({manifest.channel_names})"
            )
        if isinstance(t, int) and t != manifest.window:
            raise BundleError(f"{path}: model {kind} window is {t}, manifest says {manifest.window}")
    if manifest.score is not None:
        spec = manifest.score
        found = {o.name: o.shape for o in outputs}
        if spec.output not in found:
            raise BundleError(
                f"{path}: manifest score needs model output {spec.output!r}, the model has {sorted(found)}"
            )
        shape = found[spec.output]
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != len(spec.mean)):
            raise BundleError(
                f"{path}: output {spec.output!r} has shape {shape}, expected [batch, {len(spec.mean)}] "
                "to match score.mean"
            )


def load_bundle(path: str | os.PathLike[str], threads: int = 1) -> Bundle:
    """Verify and open a bundle; raises BundleError naming the file and the problem."""
    root = Path(path)
    manifest, raw = _read_manifest(root)
    _verify_files(root, manifest)
    model_path = root / manifest.model_file
    try:
        session = _make_session(model_path, threads)
    except Exception as e:  # onnxruntime raises several private exception types
        raise BundleError(f"{model_path}: not a loadable ONNX model: {str(e).splitlines()[0][:300]}") from e
    _check_model(model_path, manifest, session)
    digest = hashlib.sha256(raw).hexdigest()
    _verify_manifest_sha(root, digest)
    model_id = f"{root.resolve().name}-{digest[:12]}"
    return Bundle(path=root, manifest=manifest, model_id=model_id, session=session, threads=threads)


def _verify_manifest_sha(root: Path, digest: str) -> None:
    path = root / MANIFEST_SHA_NAME
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise BundleError(
            f"{path}: missing; the bundle was not finalized (finalize_bundle writes it after manifest.json)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: unreadable: {e}") from e
    want = text.split()[0].lower() if text.split() else ""
    if want != digest:
        raise BundleError(
            f"{root / MANIFEST_NAME}: sha256 mismatch (manifest.sha256 {want[:12]}..., file {digest[:12]}...): "
            "manifest.json was modified after the bundle was finalized"
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finalize_bundle(directory: str | os.PathLike[str], manifest: Manifest) -> Manifest:
    """Hash every file in `directory`, then write manifest.json last via an atomic rename.

    Until this returns, the directory has no (valid) manifest, so a crash mid-training never leaves a
    bundle that loads.
    """
    root = Path(directory)
    files: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST_NAME, MANIFEST_SHA_NAME) and not p.name.endswith(".tmp"):
            files[p.relative_to(root).as_posix()] = sha256_file(p)
    if manifest.model_file not in files:
        raise BundleError(f"{root / manifest.model_file}: model file missing; refusing to write a manifest")
    if not manifest.edgewatch_version:
        from agent import __version__

        manifest = manifest.model_copy(update={"edgewatch_version": __version__})
    manifest = Manifest.model_validate({**manifest.model_dump(), "files": files})
    (root / MANIFEST_SHA_NAME).unlink(missing_ok=True)  # until the new one is written, nothing loads
    text = manifest.model_dump_json(indent=2) + "\n"
    _write_atomic(root / MANIFEST_NAME, text)
    _write_atomic(root / MANIFEST_SHA_NAME, f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST_NAME}\n")
    return manifest


def write_bundle(directory: str | os.PathLike[str], manifest: Manifest, files: dict[str, bytes]) -> Manifest:
    """Write `files` (relative name -> content) into `directory` and finalize it (manifest last)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    (root / MANIFEST_SHA_NAME).unlink(missing_ok=True)
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return finalize_bundle(root, manifest)
