"""Isolation Forest baseline on the same windows, so the autoencoder has something to beat.

Two feature sets: per-channel summary statistics (mean, std, min, max, slope) or the flattened window.
Both are fitted on the same scaled training windows; which one is reported is chosen by measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.ensemble import IsolationForest

Features = Literal["stats", "flat"]


def window_features(x: np.ndarray, kind: Features) -> np.ndarray:
    """[n, window, channels] (scaled) -> [n, features]."""
    if kind == "flat":
        return x.reshape(x.shape[0], -1)
    t = np.arange(x.shape[1], dtype=np.float64)
    t = (t - t.mean()) / max(float(np.sum((t - t.mean()) ** 2)), 1e-12)
    slope = np.einsum("t,ntc->nc", t, x)
    return np.concatenate([x.mean(axis=1), x.std(axis=1), x.min(axis=1), x.max(axis=1), slope], axis=1)


@dataclass
class IForestBaseline:
    kind: Features
    model: IsolationForest

    def score(self, x_scaled: np.ndarray) -> np.ndarray:
        """Anomaly score, higher = more anomalous (negated sklearn score_samples)."""
        if x_scaled.shape[0] == 0:
            return np.empty(0)
        return -self.model.score_samples(window_features(x_scaled, self.kind))


def fit_iforest(
    train_scaled: np.ndarray, kind: Features = "stats", seed: int = 0, max_windows: int = 20000
) -> IForestBaseline:
    rng = np.random.default_rng(seed)
    x = train_scaled
    if x.shape[0] > max_windows:
        x = x[np.sort(rng.choice(x.shape[0], size=max_windows, replace=False))]
    model = IsolationForest(n_estimators=200, random_state=seed, n_jobs=1)
    model.fit(window_features(x, kind))
    return IForestBaseline(kind=kind, model=model)
