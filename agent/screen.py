"""Cheap screen in front of the autoencoder: a per-device robust z-score of a few window features.

Why: scoring a window (onnxruntime run, threshold, alert state, a SQLite row) is about half of a
replay's CPU; most windows of a healthy pump look like the ones before. The screen computes per channel
the standard deviation, range (max - min) and slope of each window (numpy only, ~20 us) and compares
them with the median and MAD of that device's own recent normal windows. Not the mean: the load
setpoint moves every 12-40 min and the pump stops for minutes, so a window's level against the last
hour's median flagged 40-50 % of a healthy simulated pump's windows when this was built. A window goes to the
autoencoder when any feature is more than `z` robust standard deviations off, when it is every
`every_k`-th window on the global window grid, during the device's warm-up, or while the device is
held (an open alert, or an anomalous verdict in the last `hold` windows). The rest are skipped.
The default is on with `z` = inf (no feature test: every k-th, warm-up and hold windows only), the
setting `edgewatch eval screen` favoured on simulator days (docs/results.md, Cheap-screen ensemble).

What a skipped window is: judged normal by the screen, and nothing else. It gets no Judgement, so it
does not reach the threshold, the alert state machine, the `scores` table (whose `error` column is
NOT NULL: a skipped window has no reconstruction error, and it is not stored as 0 or NaN), or
`on_judgement`. That keeps the alert rules exact where they matter:

- open (k of the last n windows anomalous): after any anomalous verdict the device is held for
  `hold` = the alert's `open_n` windows, all scored, so an opening k-of-n run is seen window by window
  once its first anomalous window reaches the autoencoder; windows skipped before that run held no
  anomalous verdict, so leaving them out of the k-of-n history changes no count. The price is delay:
  the run is seen from the first window the screen flags (or the next every-k window), not earlier.
- update and resolve (m windows under the recovery threshold): while an alert is open every window is
  scored, so they see real scores only.
- the threshold baseline learns only windows sent for a reason independent of their content (warm-up
  and every-k windows), i.e. a uniform 1/every_k sample of what it learns without the screen; flagged
  windows (enriched in start/stop transients with high errors) would bias its median upward.

The screen's own history learns the features of windows finally judged normal (skipped ones, and
scored ones the autoencoder judged normal) while the device is not held, so it follows a new
operating point the autoencoder accepts. State is in memory: with a finite `z`, after a restart or a model
swap each device warms up again (every window scored for `warmup` windows); with `z` = inf (the
default) there is nothing to warm up, and only a hold that was counting down is forgotten (an open
alert is persisted and holds again). A smoothed threshold
(`threshold.ewma_alpha` < 1) would average over the scored windows only, so the combination is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent import metrics
from agent.types import Judgement, Window

MAD_TO_SD = 1.4826  # MAD x this = standard deviation of a normal distribution
REFRESH_EVERY = 16  # learnt windows between two recomputations of a device's median and MAD
FEATURES = ("std", "range", "slope")


class ScreenConfig(BaseModel):
    """[screen] settings: the cheap per-device screen that decides which windows the autoencoder scores."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="Screen windows before the autoencoder (off: every window is scored). On by default: "
        "measured on simulator days it saved a third of the CPU with no event lost and no later "
        "detection (docs/results.md, Cheap-screen ensemble). Cannot be combined with "
        "threshold.ewma_alpha < 1.",
    )
    z: float = Field(
        math.inf,
        gt=0.0,
        description="A window goes to the autoencoder when any feature (per channel std, range, slope) "
        "is more than z robust standard deviations (1.4826 x MAD) from the device's recent median. "
        "Default inf = no feature test (only every_k, warm-up and hold windows are scored), which the "
        "measurement favoured; z = 4 scores windows that look unusual between the every-k ones.",
    )
    every_k: int = Field(
        8,
        ge=1,
        description="Every k-th window on the global window grid is scored regardless of the screen "
        "(1 = every window); bounds the delay for a fault the features do not show, and is the "
        "threshold baseline's sample.",
    )
    history: int = Field(
        512,
        ge=16,
        le=100_000,
        description="Recent normal windows per device whose features give the median and MAD.",
    )
    warmup: int = Field(
        128,
        ge=16,
        description="With a finite z: normal windows a device's history needs before the screen may skip "
        "any of its windows; until then (also after a restart or a model swap) every window is scored. "
        "No warm-up with z = inf (no history is used).",
    )


@dataclass
class _Device:
    """One device's feature history (a ring) and its cached median and robust scale."""

    ring: np.ndarray
    count: int = 0
    pos: int = 0
    since_refresh: int = 0
    median: np.ndarray | None = None
    scale: np.ndarray | None = None
    held: int = 0  # windows still to be scored after an anomalous verdict or an open alert

    def learn(self, features: np.ndarray) -> None:
        self.ring[self.pos] = features
        self.pos = (self.pos + 1) % len(self.ring)
        self.count += 1
        self.since_refresh += 1

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Median and robust scale of the history, recomputed every REFRESH_EVERY learnt windows."""
        if self.median is None or self.scale is None or self.since_refresh >= REFRESH_EVERY:
            data = self.ring[: min(self.count, len(self.ring))]
            med = np.median(data, axis=0)
            mad = np.median(np.abs(data - med), axis=0)
            # a feature that sat still (a stuck channel's std) must not divide by zero: any change of it
            # then flags, which costs CPU, never recall
            self.median = med
            self.scale = np.maximum(MAD_TO_SD * mad, 1e-9 + 1e-6 * np.abs(med))
            self.since_refresh = 0
        return self.median, self.scale


@dataclass
class _Pending:
    features: np.ndarray
    sampled: bool  # warm-up or every-k: independent of the window's content
    held: bool


@dataclass
class Screen:
    """Decides per window whether the autoencoder scores it; one instance per pipeline and model.

    `period` and `stride` are the bundle's (for the every-k grid), `hold` the alerts' open_n.
    """

    config: ScreenConfig
    period: float
    stride: int
    hold: int
    _devices: dict[str, _Device] = field(default_factory=dict)
    _pending: dict[tuple[str, float], _Pending] = field(default_factory=dict)
    _basis: dict[int, np.ndarray] = field(default_factory=dict)
    _counters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.period > 0 and math.isfinite(self.period)) or self.stride < 1 or self.hold < 0:
            raise ValueError(f"bad screen grid: period {self.period}, stride {self.stride}, hold {self.hold}")

    # -- pipeline API -------------------------------------------------------------------------------
    def flag(self, windows: Sequence[Window], busy: Callable[[str], bool] | None = None) -> list[bool]:
        """True for each window the autoencoder must score. `busy(device)`: an alert is open.

        Skipped windows are learnt here (their verdict is the screen's); scored ones wait for
        `observe`, so a window the autoencoder calls anomalous never enters the history.
        """
        self._pending.clear()  # the previous batch is done (or its scoring failed)
        if not windows:
            return []
        if not self.config.enabled:
            return [True] * len(windows)
        finite_z = math.isfinite(self.config.z)
        # the features are only needed for the feature test (and its history)
        feats = self.features(windows) if finite_z else np.empty((len(windows), 0))
        out: list[bool] = []
        for w, f in zip(windows, feats, strict=True):
            dev = self._device(w.device, f.size)
            held = dev.held > 0 or (busy is not None and busy(w.device))
            if dev.held > 0:
                dev.held -= 1
            # without a feature test there is no history to learn, so no warm-up: which windows are
            # scored then depends on the data alone (the grid and the verdicts), not on when the
            # process started, and a restarted agent scores what a replay of the same data scores
            warm = finite_z and dev.count < self.config.warmup
            every = self.every_k_window(w)
            if held:
                decision = "hold"
            elif warm:
                decision = "warmup"
            elif every:
                decision = "every_k"
            elif math.isinf(self.config.z):
                decision = "skipped"
            else:
                med, scale = dev.stats()
                decision = "flagged" if float(np.max(np.abs(f - med) / scale)) > self.config.z else "skipped"
            self._count(decision)
            if decision == "skipped":
                dev.learn(f)
                out.append(False)
            else:
                self._pending[(w.device, w.end_ts)] = _Pending(f, sampled=warm or every, held=held)
                out.append(True)
        return out

    def observe(self, judgement: Judgement, alert_open: bool) -> bool:
        """The autoencoder's verdict on a window `flag` sent; returns whether the threshold may learn
        it (warm-up and every-k windows only: a uniform sample). An anomalous verdict or an open alert
        holds the device for `hold` windows."""
        s = judgement.score
        pending = self._pending.pop((s.device, s.end_ts), None)
        if not self.config.enabled:
            return True
        dev = self._devices.get(s.device)
        if pending is None or dev is None:  # not sent by flag (cannot happen in the pipeline): learn nothing
            return False
        if judgement.anomalous or alert_open:
            dev.held = max(dev.held, self.hold)
        elif not pending.held:
            dev.learn(pending.features)
        return pending.sampled

    # -- helpers ------------------------------------------------------------------------------------
    def every_k_window(self, w: Window) -> bool:
        """Every k-th window end on the global grid (restart-proof, the same in replay and live)."""
        k = self.config.every_k
        return k == 1 or (round(w.end_ts / self.period) // self.stride) % k == 0

    def features(self, windows: Sequence[Window]) -> np.ndarray:
        """[len(windows), 3 x channels]: per channel std, range and slope (units per sample)."""
        x = np.stack([np.asarray(w.data, dtype=np.float64) for w in windows])  # [B, T, C]
        n = x.shape[1]
        basis = self._basis.get(n)
        if basis is None:
            t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
            denom = float(np.sum(t * t)) or 1.0
            basis = self._basis[n] = np.vstack([np.full(n, 1.0 / n), t / denom])  # mean, slope weights
        ms = np.einsum("kt,btc->bkc", basis, x)
        mean, slope = ms[:, 0], ms[:, 1]
        var = np.einsum("t,btc->bc", basis[0], x * x) - mean * mean
        std = np.sqrt(np.maximum(var, 0.0))
        rng = x.max(axis=1) - x.min(axis=1)
        return np.concatenate([std, rng, slope], axis=1)

    def devices(self) -> list[str]:
        return sorted(self._devices)

    def warmed_up(self, device: str) -> bool:
        dev = self._devices.get(device)
        return dev is not None and dev.count >= self.config.warmup

    def _device(self, device: str, n_features: int) -> _Device:
        dev = self._devices.get(device)
        if dev is None or dev.ring.shape[1] != n_features:
            dev = self._devices[device] = _Device(ring=np.empty((self.config.history, n_features)))
        return dev

    def _count(self, decision: str, n: int = 1) -> None:
        child = self._counters.get(decision)
        if child is None:
            child = self._counters[decision] = metrics.SCREEN_WINDOWS.labels(decision)
        child.inc(n)


def make_screen(
    config: ScreenConfig, period: float, stride: int, hold: int, ewma_alpha: float
) -> Screen | None:
    """The pipeline's screen, or None when disabled (then the pipeline runs exactly as without one)."""
    if not config.enabled:
        return None
    if ewma_alpha < 1.0:
        raise ValueError(
            "screen.enabled with threshold.ewma_alpha < 1: the smoothed score would average over the "
            "scored windows only; use one or the other"
        )
    return Screen(config, period, stride, hold)
