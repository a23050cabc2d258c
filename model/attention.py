"""Multi-head attention primitives shared by the SAM heads and the memory attention.

Projections go through `batch_invariant_linear`, so trackers batched across objects get the very
numbers a batch of one gets (the decoder's few prompt/output tokens would otherwise round differently).

`Attention` projects q/k/v (optionally into a smaller internal width), runs scaled dot-product
attention per head and projects back. `RoPEAttention` additionally rotates queries and keys with
2-D axial rotary position embeddings laid out over a square token grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import batch_invariant_linear


class Attention(nn.Module):
    """Multi-head attention whose heads work in `embedding_dim // downsample_rate` channels."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        assert self.internal_dim % num_heads == 0, "num_heads must divide embedding_dim // downsample_rate"

        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.dropout_p = dropout

    def split_heads(self, x: Tensor) -> Tensor:
        batch, tokens, channels = x.shape  # [B, N, C]
        per_head = channels // self.num_heads
        return x.view(batch, tokens, self.num_heads, per_head).transpose(1, 2)  # [B, heads, N, C/heads]

    def merge_heads(self, x: Tensor) -> Tensor:
        batch, heads, tokens, per_head = x.shape  # [B, heads, N, C/heads]
        return x.transpose(1, 2).reshape(batch, tokens, heads * per_head)  # [B, N, C]

    def project_qkv(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # q: [B, Nq, embedding_dim]; k, v: [B, Nk, kv_in_dim]
        assert k.shape[-2] == v.shape[-2], "keys and values must have the same token count"
        q, k, v = (batch_invariant_linear(proj, x) for proj, x in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: [B, heads, Nq, d], k/v: [B, heads, Nk, d] -> [B, Nq, embedding_dim]
        dropout_p = self.dropout_p if self.training else 0.0
        out = scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return batch_invariant_linear(self.out_proj, self.merge_heads(out))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = self.project_qkv(q, k, v)
        return self.attend(q, k, v)


# ---------------------------------------------------------------------------------------------
# bf16 attention on CPUs. PyTorch's fused CPU attention kernel runs no faster in bf16 than in fp32 on
# CPUs without AMX (measured on this AVX512-BF16 EPYC: 87 vs 92 ms for the 1024 x 7232 x 256
# memory cross-attention, one thread), while plain bf16 matrix products run 3-4x faster than fp32
# ones. So under bf16 autocast on the CPU, attention is computed block by block: bf16 products with
# fp32 accumulation, softmax in fp32 (rounded to bf16 for the second product), as PyTorch's
# unfused ("math") attention does under autocast. 1.7x faster than the fused kernel there; scores are
# rounded to bf16 once, where the fused kernel keeps them in fp32 (measured drift:
# bench/results/precision_bench.json).
# ---------------------------------------------------------------------------------------------
BLOCKED_BF16_ATTENTION = True
QUERY_BLOCK = 512  # rows of queries per block: [512, Nk] scores stay cache-sized and allocation-light


def use_blocked_bf16_attention(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (BLOCKED_BF16_ATTENTION and q.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.bfloat16)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """F.scaled_dot_product_attention, except bf16 on the CPU (see above). q [..., Nq, d], k/v [..., Nk, d]."""
    if dropout_p == 0.0 and use_blocked_bf16_attention(q, k, v):
        return blocked_bf16_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def blocked_bf16_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for bf16 q [..., Nq, d], k/v [..., Nk, d]; -> [..., Nq, d] bf16."""
    q = q * (q.shape[-1] ** -0.5)  # exact for d = 256 (memory attention); one bf16 rounding otherwise
    keys_t = k.transpose(-1, -2).contiguous()  # once, or every block's product would copy it again
    out = torch.empty_like(q)
    for start in range(0, q.shape[-2], QUERY_BLOCK):
        scores = torch.matmul(q[..., start : start + QUERY_BLOCK, :], keys_t)  # [..., block, Nk]
        out[..., start : start + QUERY_BLOCK, :] = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out


# ---------------------------------------------------------------------------------------------
# Axial 2-D rotary position embedding.
# Each head's channels are viewed as consecutive pairs (c0, c1) = one complex number. The first
# half of the pairs rotate with the token's x coordinate, the second half with its y coordinate,
# each using frequencies theta ** (-4 i / head_dim). Tokens are laid out row-major on a grid of
# width `grid_w`, so token t sits at x = t % grid_w, y = t // grid_w.
# ---------------------------------------------------------------------------------------------


def axial_rope_angles(head_dim: int, grid_w: int, grid_h: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles, shape [grid_w * grid_h, head_dim // 2] (x angles then y angles)."""
    assert head_dim % 4 == 0, "axial RoPE needs head_dim divisible by 4"
    exponents = torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [head_dim / 4]
    token_index = torch.arange(grid_w * grid_h, dtype=torch.float32)
    pos_x = token_index % grid_w
    pos_y = torch.div(token_index, grid_w, rounding_mode="floor")
    angles_x = pos_x[:, None] * inv_freq[None, :]  # [N, head_dim / 4]
    angles_y = pos_y[:, None] * inv_freq[None, :]
    return torch.cat([angles_x, angles_y], dim=-1)  # [N, head_dim / 2]


def axial_rope_rotation(head_dim: int, grid_w: int, grid_h: int, theta: float = 10000.0) -> Tensor:
    """Unit complex rotations e^{i angle}, complex64 [grid_w * grid_h, head_dim // 2].

    Complex multiplication (rather than explicit cos/sin products) rounds exactly like the official
    model; SAM 2 stores memories in bf16, where a one-ulp float difference can flip a rounding step.
    """
    angles = axial_rope_angles(head_dim, grid_w, grid_h, theta)
    return torch.polar(torch.ones_like(angles), angles)


def rotate_pairs(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate channel pairs of x [..., N, D] (as complex numbers) by rotation [N, D/2]; computed in fp32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [..., N, D/2]
    assert pairs.shape[-2:] == rotation.shape, f"rotation {tuple(rotation.shape)} vs pairs {tuple(pairs.shape[-2:])}"
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def apply_axial_rope(q: Tensor, k: Tensor, rotation: Tensor, repeat_for_k: bool = False,
                     key_rotation: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rotate q [B, heads, Nq, D] with the [Nq, D/2] rotations and k [B, heads, Nk, D] likewise.

    With `repeat_for_k`, k holds several frames of Nq tokens each (Nk = r * Nq) and every frame
    reuses q's positions. `key_rotation` may pass that repeated table precomputed.
    """
    q_out = rotate_pairs(q, rotation)
    if k.shape[-2] == 0:
        return q_out, k
    if key_rotation is not None:
        rotation = key_rotation
    elif repeat_for_k:
        repeats = k.shape[-2] // q.shape[-2]
        assert repeats * q.shape[-2] == k.shape[-2], "key count must be a multiple of query count"
        rotation = rotation.repeat(repeats, 1)
    return q_out, rotate_pairs(k, rotation)


class RoPEAttention(Attention):
    """Attention with axial rotary position encoding on a square token grid.

    forward's `num_k_exclude_rope` trailing keys (object-pointer tokens) are not rotated.
    """

    def __init__(
        self,
        *args,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        feat_sizes: tuple[int, int] = (64, 64),  # (w, h) of the stride-16 grid at 1024 px
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self.head_dim = self.internal_dim // self.num_heads
        # Plain attributes rather than buffers: they are not part of the checkpoint.
        self.rope_grid = (int(feat_sizes[0]), int(feat_sizes[1]))
        self.rope_rotation = axial_rope_rotation(self.head_dim, *self.rope_grid, theta=rope_theta)
        self._key_rotation: tuple | None = None  # ((table, repeats), table repeated for that many frames)

    def key_rotation(self, rotation: Tensor, num_keys: int) -> Tensor:
        """`rotation` tiled over the num_keys // Nq frames of keys; kept, since memory holds ~7 frames."""
        repeats = num_keys // rotation.shape[0]
        assert repeats * rotation.shape[0] == num_keys, "key count must be a multiple of query count"
        key = (rotation, repeats)
        if self._key_rotation is None or self._key_rotation[0][0] is not rotation or self._key_rotation[0][1] != repeats:
            self._key_rotation = (key, rotation.repeat(repeats, 1))
        return self._key_rotation[1]

    def rope_table(self, num_tokens: int, device: torch.device) -> Tensor:
        if self.rope_rotation.shape[0] != num_tokens:
            # Token count differs from the configured grid (other image size): assume a square grid.
            side = math.isqrt(num_tokens)
            assert side * side == num_tokens, f"RoPE needs a square token grid, got {num_tokens} tokens"
            self.rope_grid = (side, side)
            self.rope_rotation = axial_rope_rotation(self.head_dim, side, side, theta=self.rope_theta)
        if self.rope_rotation.device != device:
            self.rope_rotation = self.rope_rotation.to(device)
        return self.rope_rotation

    def forward(self, q: Tensor, k: Tensor, v: Tensor, num_k_exclude_rope: int = 0) -> Tensor:
        q, k, v = self.project_qkv(q, k, v)  # [B, heads, N, head_dim]
        num_q = q.shape[-2]
        if num_q != k.shape[-2]:
            assert self.rope_k_repeat, "query/key token counts differ; RoPE needs rope_k_repeat=True"
        rotation = self.rope_table(num_q, q.device)

        num_k_rope = k.shape[-2] - num_k_exclude_rope
        key_rotation = self.key_rotation(rotation, num_k_rope) if self.rope_k_repeat and num_k_rope > 0 else None
        q, k_rotated = apply_axial_rope(q, k[:, :, :num_k_rope], rotation, repeat_for_k=self.rope_k_repeat,
                                        key_rotation=key_rotation)
        k = torch.cat([k_rotated, k[:, :, num_k_rope:]], dim=-2)
        return self.attend(q, k, v)
