"""Hiera (hierarchical ViT, arXiv:2306.00989) trunk as used by SAM 2.

Tokens are kept channels-last, [B, H, W, C], throughout the trunk; the stage outputs are returned as NCHW.
Parameter names match the official checkpoints (patch_embed.proj, pos_embed, pos_embed_window,
blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.layers.*, proj}).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import scaled_dot_product_attention
from .common import MLP, DropPath


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def _padded_size(size: int, window: int) -> int:
    """Smallest multiple of `window` that is >= size."""
    return size + (window - size % window) % window


def partition_windows(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] -> [B * nH * nW, window, window, C], zero-padding bottom/right up to a multiple of `window`."""
    batch, height, width, channels = x.shape
    padded_h, padded_w = _padded_size(height, window), _padded_size(width, window)
    if padded_h != height or padded_w != width:
        x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
    rows, cols = padded_h // window, padded_w // window
    x = x.view(batch, rows, window, cols, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch * rows * cols, window, window, channels)


def merge_windows(windows: Tensor, window: int, out_hw: tuple[int, int]) -> Tensor:
    """Inverse of partition_windows: [B * nH * nW, window, window, C] -> [B, H, W, C] with padding cropped."""
    height, width = out_hw
    padded_h, padded_w = _padded_size(height, window), _padded_size(width, window)
    rows, cols = padded_h // window, padded_w // window
    assert windows.shape[0] % (rows * cols) == 0, (windows.shape, window, out_hw)
    batch = windows.shape[0] // (rows * cols)
    x = windows.reshape(batch, rows, cols, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    if padded_h != height or padded_w != width:
        x = x[:, :height, :width, :]
    return x


def pool_channels_last(x: Tensor, pool: nn.Module | None) -> Tensor:
    """Apply an NCHW pooling module to a channels-last [B, H, W, C] tensor."""
    if pool is None:
        return x
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Strided conv stem: [B, in_chans, S, S] -> [B, S/4, S/4, embed_dim] (channels-last)."""

    def __init__(
        self,
        kernel_size: tuple[int, int] = (7, 7),
        stride: tuple[int, int] = (4, 4),
        padding: tuple[int, int] = (3, 3),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------------
# Attention and block
# ----------------------------------------------------------------------------------------------------------


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention over a [B, H, W, dim] grid; queries are optionally pooled (stage transition),
    so the output is [B, H', W', dim_out] with H', W' the pooled size."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None) -> None:
        super().__init__()
        assert dim_out % num_heads == 0, (dim_out, num_heads)
        self.dim = dim
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        head_dim = self.dim_out // self.num_heads
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, head_dim)
        query, key, value = qkv.unbind(2)  # each [B, H*W, heads, head_dim]

        if self.q_pool is not None:
            query = pool_channels_last(query.reshape(batch, height, width, self.dim_out), self.q_pool)
            height, width = query.shape[1:3]
            query = query.reshape(batch, height * width, self.num_heads, head_dim)

        out = scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        )  # [B, heads, H'*W', head_dim]
        out = out.transpose(1, 2).reshape(batch, height, width, self.dim_out)
        return self.proj(out)


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block with optional windowing, query pooling and a channel change.

    [B, H, W, dim] -> [B, H/s, W/s, dim_out] where s is q_stride (1 when the block does not pool).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer: str | Callable[[int], nn.Module] = "LayerNorm",
        q_stride: tuple[int, int] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(norm_layer, str):
            norm_layer = partial(getattr(nn, norm_layer), eps=1e-6)

        self.dim = dim
        self.dim_out = dim_out
        self.window_size = window_size  # 0 means global attention
        self.q_stride = q_stride
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride, ceil_mode=False) if q_stride else None

        self.norm1 = norm_layer(dim)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads=num_heads, q_pool=self.pool)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim_out)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=act_layer)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm1(x)  # [B, H, W, dim]

        # At a channel change the residual path is projected (from the normed input) and pooled like the queries.
        shortcut = x if self.dim == self.dim_out else pool_channels_last(self.proj(normed), self.pool)
        out_hw = (shortcut.shape[1], shortcut.shape[2])

        if self.window_size > 0:
            windows = partition_windows(normed, self.window_size)  # [B*nW, ws, ws, dim]
            attended = self.attn(windows)  # [B*nW, ws/s, ws/s, dim_out]
            # Pooling shrinks every window by the stride, so the same window grid covers the pooled map.
            out_window = self.window_size // self.q_stride[0] if self.q_stride else self.window_size
            assert attended.shape[1] == out_window, (attended.shape, out_window)
            attended = merge_windows(attended, out_window, out_hw)  # [B, H', W', dim_out]
        else:
            attended = self.attn(normed)  # [B, H', W', dim_out]

        x = shortcut + self.drop_path(attended)
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------------------
# Trunk
# ----------------------------------------------------------------------------------------------------------


class Hiera(nn.Module):
    """Four-stage Hiera trunk. forward([B, 3, S, S]) returns the stage outputs, highest resolution first:
    [B, C, S/4, S/4], [B, 2C, S/8, S/8], [B, 4C, S/16, S/16], [B, 8C, S/32, S/32] (only the last one when
    return_interm_layers is False). `channel_list` lists their channel counts lowest resolution first."""

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        drop_path_rate: float = 0.0,
        q_pool: int = 3,  # how many stage transitions pool the queries
        q_stride: tuple[int, int] = (2, 2),
        stages: Sequence[int] = (2, 3, 16, 3),  # blocks per stage
        dim_mul: float = 2.0,  # channel multiplier at each stage transition
        head_mul: float = 2.0,  # head-count multiplier at each stage transition
        window_pos_embed_bkg_spatial_size: Sequence[int] = (14, 14),
        window_spec: Sequence[int] = (8, 4, 14, 7),  # window size per stage (blocks not in global_att_blocks)
        global_att_blocks: Sequence[int] | None = (12, 16, 20),
        weights_path: str | None = None,  # config compatibility only; checkpoints are loaded by model/checkpoints.py
        return_interm_layers: bool = True,
    ) -> None:
        super().__init__()
        if weights_path is not None:
            raise ValueError("Hiera does not load weights itself; load the full checkpoint instead")
        assert len(stages) == len(window_spec), (stages, window_spec)
        self.window_spec = window_spec
        self.q_stride = q_stride
        # Index of the last block of every stage.
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        assert 0 <= q_pool <= len(self.stage_ends) - 1, q_pool
        # The first block of each of the first q_pool later stages pools.
        self.q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.return_interm_layers = return_interm_layers
        self.global_att_blocks = global_att_blocks
        self.window_pos_embed_bkg_spatial_size = window_pos_embed_bkg_spatial_size

        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        # Windowed absolute position embedding (arXiv:2311.05613): a coarse background embedding resized to the
        # token grid plus a per-window embedding tiled over it.
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        self._pos_cache: tuple | None = None  # (key, [1, H, W, C]); see _position_embedding

        depth = sum(stages)
        drop_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth ramp
        self.blocks = nn.ModuleList()
        stage = 0
        dim = embed_dim
        for i in range(depth):
            # The window size of a stage's first block still follows the previous stage (it pools down into
            # the current one), hence it is read before the stage index advances.
            window_size = window_spec[stage]
            if global_att_blocks is not None and i in global_att_blocks:
                window_size = 0
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out = int(dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(
                MultiScaleBlock(
                    dim=dim,
                    dim_out=dim_out,
                    num_heads=num_heads,
                    drop_path=drop_rates[i],
                    q_stride=q_stride if i in self.q_pool_blocks else None,
                    window_size=window_size,
                )
            )
            dim = dim_out

        returned = self.stage_ends[::-1] if return_interm_layers else [self.stage_ends[-1]]
        self.channel_list = [self.blocks[i].dim_out for i in returned]

    @property
    def channels_list(self) -> list[int]:
        return self.channel_list

    def _position_embedding(self, height: int, width: int) -> Tensor:
        """[1, H, W, C] = bicubic-resized pos_embed + pos_embed_window tiled over the token grid.

        Constant for given weights, so computed once per grid (the bicubic resize alone was ~3% of an
        encoder pass at 512 px); the key holds the parameters' version counters, which every in-place
        change (load_state_dict, fine-tuning steps) bumps, so new weights are never served stale.
        """
        key = (height, width, self.pos_embed.device, self.pos_embed.dtype, self.pos_embed._version,
               self.pos_embed_window._version,
               torch.is_grad_enabled())
        if self._pos_cache is None or self._pos_cache[0] != key:
            self._pos_cache = (key, self._compute_position_embedding(height, width))
        return self._pos_cache[1]

    def _compute_position_embedding(self, height: int, width: int) -> Tensor:
        window = self.pos_embed_window  # [1, C, w, w]
        win_h, win_w = window.shape[-2:]
        assert height % win_h == 0 and width % win_w == 0, (
            f"token grid {height}x{width} is not a multiple of the {win_h}x{win_w} window position embedding"
        )
        background = F.interpolate(self.pos_embed, size=(height, width), mode="bicubic")  # [1, C, H, W]
        pos = background + window.tile(1, 1, height // win_h, width // win_w)
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> list[Tensor]:
        assert x.ndim == 4, x.shape
        x = self.patch_embed(x)  # [B, S/4, S/4, C]
        x = x + self._position_embedding(x.shape[1], x.shape[2])

        outputs = []
        last = self.stage_ends[-1]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == last or (self.return_interm_layers and i in self.stage_ends):
                outputs.append(x.permute(0, 3, 1, 2))  # [B, C_i, H_i, W_i]
        return outputs
