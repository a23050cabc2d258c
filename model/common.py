"""Tiny layers shared by several architecture boxes. Parameter names follow the official checkpoints."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


# Rows per batch item below which `batch_invariant_linear` runs item by item. BLAS picks its algorithm
# from the problem size: a single row goes through GEMV, and with several threads a small GEMM splits
# its reduction across them, so B items of N rows in one [B*N, K] call do not round like B calls of
# [N, K]. Large problems are split over rows and columns only and round the same at any batch size
# (measured on this CPU for every shape the tracker uses: tests/model/test_batched_step.py).
BATCH_INVARIANT_MIN_ROWS = 256


def batch_invariant_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for x [B, ..., C], computed so that item b's result does not depend on B.

    Small items (fewer than BATCH_INVARIANT_MIN_ROWS rows each: decoder tokens, pointer heads) run one
    at a time, exactly as a batch-1 call would; large ones run batched.
    """
    batch = x.shape[0]
    rows_per_item = math.prod(x.shape[1:-1])  # 1 for [B, C]
    if x.dim() < 2 or batch == 1 or rows_per_item >= BATCH_INVARIANT_MIN_ROWS:
        return layer(x)
    return torch.cat([layer(x[i : i + 1]) for i in range(batch)])


class MLP(nn.Module):
    """`num_layers` Linear layers (`layers.{i}`) with `activation` between them (not after the last).

    batch_invariant: item b of a batch gets the very same result as a batch of one (see
    `batch_invariant_linear`); used by the heads that trackers batch across objects.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
        batch_invariant: bool = False,
    ) -> None:
        super().__init__()
        self.batch_invariant = batch_invariant
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = batch_invariant_linear(layer, x) if self.batch_invariant else layer(x)
            if i < last:
                x = self.act(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's residual branch with probability `drop_prob` (training only)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep_mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            keep_mask.div_(keep_prob)
        return x * keep_mask


def activation_by_name(name: str) -> type[nn.Module]:
    table = {"relu": nn.ReLU, "gelu": nn.GELU, "glu": nn.GLU}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]
