"""Score windows with the bundle's int8 LSTM autoencoder (onnxruntime only, no torch).

The error definition lives in `window_errors` (and `latent_t2` for bundles whose manifest asks for the
code's T2), which offline calibration uses too, so the thresholds in the manifest and the live scores
are the same quantity.
"""

from __future__ import annotations

import numpy as np

from agent.bundle import Bundle
from agent.types import Score, Window


def window_errors(x_scaled: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruction error of a batch: per channel the mean squared error over time, total = mean.

    `x_scaled`, `recon`: [batch, window, channels]. Returns `(total [batch], per_channel [batch, c])`
    in float64. Mean (not sum) over channels keeps the scale independent of the channel count.
    """
    x = np.asarray(x_scaled, dtype=np.float64)
    r = np.asarray(recon, dtype=np.float64)
    if x.shape != r.shape or x.ndim != 3:
        raise ValueError(f"expected matching [batch, window, channels] arrays, got {x.shape} and {r.shape}")
    # sum / n is what np.mean computes (the same add.reduce, then one division), without its
    # Python-level wrapper: this runs once per scored window
    per_channel = ((x - r) ** 2).sum(axis=1) / x.shape[1]
    return per_channel.sum(axis=1) / x.shape[2], per_channel


def latent_t2(codes: np.ndarray, mean: np.ndarray, inv_cov: np.ndarray) -> np.ndarray:
    """Hotelling T2 of each code [batch, H] against the training codes' mean and inverse covariance."""
    d = np.asarray(codes, dtype=np.float64) - mean
    return np.einsum("ij,jk,ik->i", d, inv_cov, d)


class Scorer:
    """Runs a verified bundle on windows; one onnxruntime session, batched calls."""

    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self._session = bundle.session if threads == bundle.threads else bundle.make_session(threads)
        self._input = self._session.get_inputs()[0].name
        self._center = np.asarray(m.scaler.center, dtype=np.float32)
        self._scale = np.asarray(m.scaler.scale, dtype=np.float32)
        self._channels = m.channel_names
        self._outputs: list[str] | None = None  # None: every output, the first is the reconstruction
        self._t2: tuple[np.ndarray, np.ndarray] | None = None
        if m.score is not None:
            first = self._session.get_outputs()[0].name
            self._outputs = [first, m.score.output]
            self._t2 = (np.asarray(m.score.mean, np.float64), np.asarray(m.score.inv_cov, np.float64))

    @property
    def channels(self) -> list[str]:
        return list(self._channels)

    @property
    def window(self) -> int:
        return self.bundle.manifest.window

    @property
    def stride(self) -> int:
        return self.bundle.manifest.stride

    @property
    def period(self) -> float:
        return self.bundle.manifest.sample_period_s

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    def scale(self, data: np.ndarray) -> np.ndarray:
        """Physical units -> model units, float32 (`data` [..., channels])."""
        return ((np.asarray(data, dtype=np.float32) - self._center) / self._scale).astype(np.float32)

    def errors(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window score [batch], per-channel reconstruction error [batch, c]) for a raw
        [batch, window, channels] array in physical units. The window score is the reconstruction
        error (`window_errors`), or the code's T2 when the manifest says so; the per-channel errors
        are always the reconstruction's, for attribution."""
        x = self.scale(batch)
        if x.ndim != 3 or x.shape[1:] != (self.window, len(self._channels)):
            raise ValueError(
                f"windows must be [batch, {self.window}, {len(self._channels)}] ({self._channels}), "
                f"got {list(x.shape)}"
            )
        if not np.all(np.isfinite(x)):
            raise ValueError("windows contain NaN/inf: gaps must break windows before scoring")
        outs = self._session.run(self._outputs, {self._input: x})
        total, per = window_errors(x, outs[0])
        if self._t2 is not None:
            total = latent_t2(outs[1], *self._t2)
        return total, per

    def score(self, windows: list[Window]) -> list[Score]:
        """Score all `windows` in one onnxruntime run, in order."""
        if not windows:
            return []
        want = (self.window, len(self._channels))
        for w in windows:
            if np.shape(w.data) != want:
                raise ValueError(
                    f"window of {w.device} ending {w.end_ts}: shape {list(np.shape(w.data))}, the model needs "
                    f"{list(want)} ({self._channels})"
                )
        batch = np.stack([np.asarray(w.data, dtype=np.float32) for w in windows])
        total, per = self.errors(batch)
        names = self._channels
        mid = self.model_id
        return [
            Score(
                device=w.device,
                start_ts=w.start_ts,
                end_ts=w.end_ts,
                error=err,
                channel_errors=dict(zip(names, errs, strict=True)),
                model_id=mid,
            )
            for w, err, errs in zip(windows, total.tolist(), per.tolist(), strict=True)
        ]

    def attribution(self, score: Score) -> dict[str, float]:
        """Each channel's z-score against its calibrated normal error (which sensor looks abnormal)."""
        cal = self.bundle.manifest.calibration
        return {
            n: (score.channel_errors[n] - mu) / max(sd, 1e-12)
            for n, mu, sd in zip(self._channels, cal.channel_error_mean, cal.channel_error_std, strict=True)
        }
