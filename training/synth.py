"""A tiny synthetic pump recording in the simulator's CSV format, for fast tests and examples.

Not a stand-in for `firmware_sim` (which models the physics): just smooth periodic signals with noise,
a few missing values, one long dropout, and optionally a labelled progressive fault, generated in
milliseconds so tests can train real (tiny) models on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HEADER = "ts,device,temperature,vibration,pressure,machine_state,fault,sensor_fault"


def synth_rows(
    seconds: int,
    devices: int = 2,
    seed: int = 0,
    fault_at: float | None = None,
    start: float = 1_764_547_200.0,
    new_normal_at: float | None = None,
) -> list[str]:
    """CSV lines (no header). With `fault_at` (share of the duration), pump-01 develops bearing wear.
    With `new_normal_at`, pump-01 moves to another operating point then (faster, higher vibration,
    higher pressure), still labelled normal: what a model that never saw it flags as a false alarm."""
    rng = np.random.default_rng(seed)
    t = np.arange(seconds, dtype=np.float64)
    stamps = np.datetime_as_string(((start + t) * 1000).astype("datetime64[ms]"), unit="ms")
    rows: list[tuple[float, int, str]] = []
    for d in range(devices):
        ph = rng.uniform(0, 2 * np.pi, 3)
        temp = 40 + 2 * np.sin(2 * np.pi * t / 600 + ph[0]) + rng.normal(0, 0.05, t.size)
        vib = 2 + 0.4 * np.sin(2 * np.pi * t / 40 + ph[1]) + rng.normal(0, 0.03, t.size)
        pres = 3 + 0.3 * np.sin(2 * np.pi * t / 90 + ph[2]) + rng.normal(0, 0.01, t.size)
        if new_normal_at is not None and d == 0:
            on = t >= int(new_normal_at * seconds)
            fast = 2.8 + 0.6 * np.sin(2 * np.pi * t / 15 + ph[1]) + rng.normal(0, 0.03, t.size)
            vib = np.where(on, fast, vib)
            pres = np.where(on, pres + 0.4, pres)
        state = np.full(t.size, "normal", dtype=object)
        fault = np.full(t.size, "", dtype=object)
        sensor = np.full(t.size, "", dtype=object)
        if fault_at is not None and d == 0:
            f0 = int(fault_at * seconds)
            sev = np.clip((t - f0) / max(seconds - f0, 1), 0, 1)
            vib = vib + 1.5 * sev + 1.0 * sev * np.sin(2 * np.pi * t / 7)
            temp = temp + 3 * sev
            state[f0:] = "degrading"
            state[f0 + int(0.8 * (seconds - f0)) :] = "failed"
            fault[f0:] = "bearing_wear"
        cells = [
            [f"{v:.2f}" for v in temp],
            [f"{v:.3f}" for v in vib],
            [f"{v:.3f}" for v in pres],
        ]
        # isolated missing values (bridged by interpolation) and one 40 s dropout (a window break)
        for i in rng.choice(np.arange(5, seconds // 2), size=3, replace=False).tolist():
            cells[int(rng.integers(3))][i] = "nan"
            sensor[i] = "nan"
        d0 = seconds // 3
        for c in cells:
            for i in range(d0, d0 + 40):
                c[i] = ""
        sensor[d0 : d0 + 40] = "dropout"
        for i in range(t.size):
            line = f"{stamps[i]}Z,pump-{d + 1:02d},{cells[0][i]},{cells[1][i]},{cells[2][i]},{state[i]},{fault[i]},{sensor[i]}"
            rows.append((t[i], d, line))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows]


def write_synth_csv(
    path: str | Path,
    seconds: int,
    devices: int = 2,
    seed: int = 0,
    fault_at: float | None = None,
    new_normal_at: float | None = None,
) -> Path:
    p = Path(path)
    rows = synth_rows(seconds, devices, seed, fault_at, new_normal_at=new_normal_at)
    p.write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="ascii")
    return p


def tiny_bundle(
    out: str | Path,
    window: int = 16,
    n_channels: int = 3,
    hidden: int = 8,
    seed: int = 0,
    latent: bool = False,
) -> Path:
    """An untrained but real int8 bundle in ~1 s, for tests of loading, verification and scoring.

    `latent=True`: the model also outputs its code and the manifest scores windows by the code's T2,
    fitted on the codes of random windows around the scaler's center.
    """
    import torch

    from agent.bundle import Calibration, ChannelSpec, Manifest, Scaler, finalize_bundle
    from training.export import export_fp32, fit_latent_t2, quantize_int8
    from training.model import LSTMAutoencoder

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LSTMAutoencoder(n_channels, hidden, 1)
    export_fp32(model, window, n_channels, root / "model.fp32.onnx", latent=latent)
    quantize_int8(root / "model.fp32.onnx", root / "model.onnx", expected_lstms=2)
    score = None
    if latent:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
        ref = np.random.default_rng(seed).normal(size=(64, window, n_channels)).astype(np.float32)
        score = fit_latent_t2(sess.run(["latent"], {"x": ref})[0], ridge=0.1)
    names = ["temperature", "vibration", "pressure", "current", "flow", "voltage"][:n_channels]
    manifest = Manifest(
        channels=[ChannelSpec(name=n, unit="u") for n in names],
        window=window,
        stride=4,
        sample_period_s=1.0,
        max_gap_s=5.0,
        scaler=Scaler(
            center=[40.0, 2.0, 3.0, 1.0, 1.0, 1.0][:n_channels],
            scale=[2.0, 0.5, 0.3, 1.0, 1.0, 1.0][:n_channels],
        ),
        calibration=Calibration(
            quantiles={"p50": 0.5, "p90": 0.8, "p99": 1.0, "p99.5": 1.2, "p99.9": 1.5},
            channel_error_mean=[0.5] * n_channels,
            channel_error_std=[0.1] * n_channels,
            n_windows=100,
        ),
        score=score,
    )
    finalize_bundle(root, manifest)
    return root
