"""Fit the autoencoder on normal windows: Adam, MSE, early stopping on validation loss, fixed seeds."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Optimiser and stopping settings."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=30, ge=1, description="maximum epochs")
    batch_size: int = Field(default=128, ge=1, description="windows per optimiser step")
    lr: float = Field(default=3e-3, gt=0, description="Adam learning rate")
    patience: int = Field(
        default=5, ge=1, description="epochs without validation improvement before stopping"
    )
    min_delta: float = Field(default=1e-4, ge=0, description="relative improvement that counts as progress")
    seed: int = Field(default=0, description="seed for torch and numpy")
    threads: int = Field(
        default=1,
        ge=1,
        le=2,
        description="torch CPU threads (1 is fastest for this small LSTM on a busy 2-core box)",
    )
    max_train_windows: int | None = Field(
        default=None, ge=1, description="random subset of training windows per epoch (None: all)"
    )
    progress: bool = Field(default=True, description="show a tqdm progress bar")


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    seconds: float = 0.0
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _eval_loss(model: nn.Module, x: torch.Tensor, batch: int) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch * 4):
            xb = x[i : i + batch * 4]
            total += float(nn.functional.mse_loss(model(xb), xb, reduction="sum"))
    return total / x.numel()


def fit(model: nn.Module, train_x: np.ndarray, val_x: np.ndarray, cfg: TrainConfig) -> History:
    """Train in place on scaled [n, window, channels] windows; restores the best-validation weights."""
    if train_x.shape[0] == 0 or val_x.shape[0] == 0:
        raise ValueError(f"need training and validation windows, got {train_x.shape[0]} and {val_x.shape[0]}")
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    xt = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    xv = torch.from_numpy(np.ascontiguousarray(val_x, dtype=np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    hist = History()
    best_state = copy.deepcopy(model.state_dict())
    bad_epochs = 0
    t0 = time.perf_counter()
    n_per_epoch = min(xt.shape[0], cfg.max_train_windows or xt.shape[0])
    steps = (n_per_epoch + cfg.batch_size - 1) // cfg.batch_size
    bar = tqdm(total=cfg.epochs * steps, disable=not cfg.progress, desc="train", unit="batch", leave=False)
    try:
        for epoch in range(cfg.epochs):
            model.train()
            order = rng.permutation(xt.shape[0])[:n_per_epoch]
            running = 0.0
            for i in range(0, n_per_epoch, cfg.batch_size):
                xb = xt[torch.from_numpy(order[i : i + cfg.batch_size])]
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(xb), xb)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                running += float(loss.detach()) * xb.shape[0]
                bar.update(1)
            hist.train_loss.append(running / n_per_epoch)
            val = _eval_loss(model, xv, cfg.batch_size)
            hist.val_loss.append(val)
            bar.set_postfix(epoch=epoch + 1, train=f"{hist.train_loss[-1]:.4f}", val=f"{val:.4f}")
            if val < hist.best_val_loss * (1.0 - cfg.min_delta):
                hist.best_val_loss = val
                hist.best_epoch = epoch + 1
                best_state = copy.deepcopy(model.state_dict())
                bad_epochs = 0
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience:
                    hist.stopped_early = True
                    break
    finally:
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    hist.seconds = time.perf_counter() - t0
    log.info(
        "trained %d epochs in %.1f s, best val loss %.5f at epoch %d",
        len(hist.val_loss),
        hist.seconds,
        hist.best_val_loss,
        hist.best_epoch,
    )
    return hist
