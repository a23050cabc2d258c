"""Fixed (parameter-free) sinusoidal position encodings used by the image encoder and memory attention."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _inverse_frequencies(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    """Per-channel divisors temperature^(2*floor(i/2)/num_feats), i in [0, num_feats). Shape [num_feats]."""
    channel = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (channel // 2) / num_feats)


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    """[..., F] angles -> [..., F] with sin on even channels and cos on odd channels (kept in place)."""
    even_sin = angles[..., 0::2].sin()
    odd_cos = angles[..., 1::2].cos()
    return torch.stack((even_sin, odd_cos), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine embedding of a feature map's pixel grid (DETR style).

    forward(x: [B, C, H, W]) -> [B, num_pos_feats, H, W]; the first half of the channels encodes the row
    (y) and the second half the column (x). Only the shape/device of `x` are used.
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: int = 10000,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        assert num_pos_feats % 2 == 0, "num_pos_feats must be even (half for y, half for x)"
        if scale is not None and not normalize:
            raise ValueError("scale is only meaningful with normalize=True")
        self.num_pos_feats = num_pos_feats // 2  # features per axis
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        # (H, W, device) -> [C, H, W]; the grid encoding never changes, so compute it once per size.
        self._grid_cache: dict[tuple[int, int, str], Tensor] = {}

    @torch.no_grad()
    def _grid_encoding(self, height: int, width: int, device: torch.device) -> Tensor:
        key = (height, width, str(device))
        cached = self._grid_cache.get(key)
        if cached is not None:
            return cached

        rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)  # [H]
        cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)  # [W]
        if self.normalize:
            eps = 1e-6
            rows = rows / (rows[-1:] + eps) * self.scale
            cols = cols / (cols[-1:] + eps) * self.scale

        divisors = _inverse_frequencies(self.num_pos_feats, self.temperature, device)  # [F]
        row_enc = _interleave_sin_cos(rows[:, None] / divisors)  # [H, F]
        col_enc = _interleave_sin_cos(cols[:, None] / divisors)  # [W, F]

        feats = self.num_pos_feats
        grid = torch.cat(
            (
                row_enc[:, None, :].expand(height, width, feats),
                col_enc[None, :, :].expand(height, width, feats),
            ),
            dim=-1,
        )  # [H, W, 2F]
        grid = grid.permute(2, 0, 1).contiguous()  # [2F, H, W]
        self._grid_cache[key] = grid
        return grid

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        grid = self._grid_encoding(height, width, x.device)  # [C, H, W]
        # Return a fresh tensor so callers may modify it without corrupting the cache.
        return grid[None].repeat(batch, 1, 1, 1)  # [B, C, H, W]


def sine_embedding_1d(positions: Tensor, dim: int, temperature: float = 10000) -> Tensor:
    """Transformer-style 1-D embedding: [N] positions -> [N, dim] = cat(sin(p/d), cos(p/d)) (not interleaved)."""
    half = dim // 2
    divisors = _inverse_frequencies(half, temperature, positions.device)  # [half]
    angles = positions.unsqueeze(-1) / divisors  # [..., half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # [..., dim]
