"""LSTM autoencoder: encoder LSTM -> last hidden state -> repeated over time -> decoder LSTM -> Linear.

Small on purpose (H32/L1 is ~13k parameters, ~22 kB int8) so that it runs in well under a millisecond
per window on a gateway; the shape is configurable for larger sensor sets.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ModelConfig(BaseModel):
    """Autoencoder shape."""

    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(default=32, ge=1, description="LSTM hidden size (encoder and decoder)")
    layers: int = Field(default=1, ge=1, le=4, description="stacked LSTM layers (encoder and decoder)")


class LSTMAutoencoder(nn.Module):
    """Reconstructs a [batch, window, channels] window from one latent vector per window."""

    def __init__(self, n_channels: int, hidden: int = 32, layers: int = 1) -> None:
        super().__init__()
        self.n_channels = n_channels
        self.hidden = hidden
        self.layers = layers
        self.encoder = nn.LSTM(n_channels, hidden, num_layers=layers, batch_first=True)
        self.decoder = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.output = nn.Linear(hidden, n_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.encoder(x)
        latent = h[-1]  # top layer's last hidden state: [batch, hidden]
        repeated = latent.unsqueeze(1).repeat(1, x.shape[1], 1)
        out, _ = self.decoder(repeated)
        return self.output(out)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
