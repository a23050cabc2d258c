"""Memory attention box: conditions the current frame's features on the memory bank.

Each layer is pre-norm: self-attention over the current frame's tokens, cross-attention from
those tokens to the memory tokens (past frames' spatial memories followed by object-pointer
tokens), then an MLP. Parameter names follow the official SAM 2 checkpoints (`memory_attention.*`).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .attention import RoPEAttention
from .common import activation_by_name


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


class MemoryAttentionLayer(nn.Module):
    """Pre-norm transformer layer: self-attn -> cross-attn to memory -> MLP, each with a residual.

    Tensors are batch-first: tgt [B, N, d_model], memory [B, M, kv_dim].
    """

    def __init__(
        self,
        activation: str,
        cross_attention: nn.Module,
        d_model: int,
        dim_feedforward: int,
        dropout: float,
        pos_enc_at_attn: bool,
        pos_enc_at_cross_attn_keys: bool,
        pos_enc_at_cross_attn_queries: bool,
        self_attention: nn.Module,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.dim_feedforward = dim_feedforward
        self.dropout_value = dropout
        self.self_attn = self_attention
        self.cross_attn_image = cross_attention

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)

        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

        self.activation_str = activation
        self.activation = activation_by_name(activation)()

        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys

    def _self_attention_block(self, tgt: torch.Tensor, query_pos: Optional[torch.Tensor]) -> torch.Tensor:
        normed = self.norm1(tgt)
        q_and_k = _with_pos(normed, query_pos) if self.pos_enc_at_attn else normed
        return tgt + self.dropout1(self.self_attn(q_and_k, q_and_k, v=normed))

    def _cross_attention_block(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        query_pos: Optional[torch.Tensor],
        pos: Optional[torch.Tensor],
        num_k_exclude_rope: int,
    ) -> torch.Tensor:
        extra = {}
        if num_k_exclude_rope > 0:
            # Object-pointer tokens sit at the end of memory and carry no spatial position,
            # so only a RoPE attention knows how to leave them un-rotated.
            if not isinstance(self.cross_attn_image, RoPEAttention):
                raise TypeError("num_k_exclude_rope > 0 requires a RoPEAttention cross-attention")
            extra["num_k_exclude_rope"] = num_k_exclude_rope
        normed = self.norm2(tgt)
        attended = self.cross_attn_image(
            q=_with_pos(normed, query_pos) if self.pos_enc_at_cross_attn_queries else normed,
            k=_with_pos(memory, pos) if self.pos_enc_at_cross_attn_keys else memory,
            v=memory,
            **extra,
        )
        return tgt + self.dropout2(attended)

    def forward(
        self,
        tgt: torch.Tensor,  # [B, N, d_model]
        memory: torch.Tensor,  # [B, M, kv_dim]
        pos: Optional[torch.Tensor] = None,  # [B, M, kv_dim], positional encoding of memory
        query_pos: Optional[torch.Tensor] = None,  # [B, N, d_model], positional encoding of tgt
        num_k_exclude_rope: int = 0,
    ) -> torch.Tensor:
        tgt = self._self_attention_block(tgt, query_pos)
        tgt = self._cross_attention_block(tgt, memory, query_pos, pos, num_k_exclude_rope)
        mlp_out = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout3(mlp_out)


class MemoryAttention(nn.Module):
    """Stack of `num_layers` copies of `layer` plus a final LayerNorm.

    Inputs and output are sequence-first like the official module:
    curr [N, B, d_model] -> [N, B, d_model]; memory [M, B, kv_dim].
    """

    def __init__(
        self,
        d_model: int,
        pos_enc_at_input: bool,
        layer: nn.Module,
        num_layers: int,
        batch_first: bool = True,  # whether the layers expect batch-first tensors
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc_at_input = pos_enc_at_input
        self.batch_first = batch_first

    def forward(
        self,
        curr: torch.Tensor | list[torch.Tensor],  # [N, B, d_model] current-frame tokens
        memory: torch.Tensor,  # [M, B, kv_dim] memory tokens; the last num_obj_ptr_tokens are object pointers
        curr_pos: Optional[torch.Tensor | list[torch.Tensor]] = None,  # [N, B, d_model]
        memory_pos: Optional[torch.Tensor] = None,  # [M, B, kv_dim]
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        # Callers holding multi-level feature lists pass a single level wrapped in a list.
        if isinstance(curr, list):
            assert isinstance(curr_pos, list) and len(curr) == len(curr_pos) == 1
            curr, curr_pos = curr[0], curr_pos[0]
        assert curr.dim() == 3 and curr.shape[-1] == self.d_model, tuple(curr.shape)
        assert curr.shape[1] == memory.shape[1], "batch size must be the same for curr and memory"
        assert 0 <= num_obj_ptr_tokens <= memory.shape[0]

        output = curr
        if self.pos_enc_at_input and curr_pos is not None:
            output = output + 0.1 * curr_pos

        if self.batch_first:
            # Contiguous batch-first copies: with B > 1 the transposed views are strided, and under bf16
            # autocast a strided Linear input takes another kernel than the B = 1 one (rounding
            # differently). With B = 1 a contiguous copy holds the same values in the same order.
            output = output.transpose(0, 1).contiguous()  # [B, N, d_model]
            memory = memory.transpose(0, 1).contiguous()  # [B, M, kv_dim]
            curr_pos = None if curr_pos is None else curr_pos.transpose(0, 1).contiguous()
            memory_pos = None if memory_pos is None else memory_pos.transpose(0, 1).contiguous()

        for layer in self.layers:
            extra = {}
            if isinstance(layer.cross_attn_image, RoPEAttention):
                extra["num_k_exclude_rope"] = num_obj_ptr_tokens
            output = layer(tgt=output, memory=memory, pos=memory_pos, query_pos=curr_pos, **extra)
        output = self.norm(output)

        if self.batch_first:
            output = output.transpose(0, 1)  # back to [N, B, d_model]
        return output
