"""PyTorch reference of tickmesh's model kinds (actors/model).

Each module maps a window ``x: float32 [B, T, F]`` (batch-first) to one
prediction per sample, ``float32 [B]``.  Parameter names are the module
attribute names (``lstm.weight_ih_l0``, ``attn_w.bias``, ``conv.weight``,
``out.weight``, ...), which are the names the Rust side (tch) writes into its
safetensors, so ``load_state_dict(..., strict=True)`` of such a file works.

Hyperparameters come from a ``meta.json`` dict: ``kind``, ``features`` (list
of names; F = len(features)), ``hidden`` (H), ``layers`` (L),
``conv_channels`` (C) and ``kernel_size`` (K, odd).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["KINDS", "LstmAttention", "Gru", "CnnLstm", "build"]


class LstmAttention(nn.Module):
    """LSTM with additive attention over time (``lstm_attention``)."""

    def __init__(self, features: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.attn_w = nn.Linear(hidden, hidden)
        self.attn_v = nn.Linear(hidden, 1, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The prediction ``[B]`` and the attention weights ``[B, T]``."""
        h, _ = self.lstm(x)  # [B, T, H]
        scores = self.attn_v(torch.tanh(self.attn_w(h)))  # [B, T, 1]
        alpha = torch.softmax(scores, dim=1)
        context = (alpha * h).sum(dim=1)  # [B, H]
        return self.out(context).squeeze(-1), alpha.squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_attention(x)[0]


class Gru(nn.Module):
    """GRU; the last time step's hidden state feeds a linear head (``gru``)."""

    def __init__(self, features: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.gru(x)  # [B, T, H]
        return self.out(h[:, -1, :]).squeeze(-1)


class CnnLstm(nn.Module):
    """Same-length 1-D convolution + ReLU over time, then an LSTM (``cnn_lstm``)."""

    def __init__(
        self, features: int, hidden: int, layers: int, conv_channels: int, kernel_size: int
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"cnn_lstm: kernel_size must be odd and >= 1, got {kernel_size}")
        self.conv = nn.Conv1d(
            features, conv_channels, kernel_size=kernel_size, padding=kernel_size // 2
        )
        self.lstm = nn.LSTM(conv_channels, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # [B, T, C]
        h, _ = self.lstm(z)  # [B, T, H]
        return self.out(h[:, -1, :]).squeeze(-1)


KINDS: tuple[str, ...] = ("lstm_attention", "gru", "cnn_lstm")


def _int(meta: Mapping[str, Any], key: str) -> int:
    if key not in meta:
        raise ValueError(f"meta is missing {key!r}")
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"meta {key!r} must be a positive integer, got {value!r}")
    return value


def build(meta: Mapping[str, Any]) -> nn.Module:
    """The module described by a ``meta.json`` dict (freshly initialized)."""
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} (expected one of {', '.join(KINDS)})")
    features = meta.get("features")
    if not isinstance(features, list) or not features:
        raise ValueError(f"meta 'features' must be a non-empty list, got {features!r}")
    f, hidden, layers = len(features), _int(meta, "hidden"), _int(meta, "layers")
    if kind == "lstm_attention":
        return LstmAttention(f, hidden, layers)
    if kind == "gru":
        return Gru(f, hidden, layers)
    return CnnLstm(f, hidden, layers, _int(meta, "conv_channels"), _int(meta, "kernel_size"))
