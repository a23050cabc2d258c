"""Memory encoder box: turns a frame's image features plus its predicted mask into a memory.

    pix_feat [B, 256, H, W] --1x1 conv--+
                                        +--> Fuser (ConvNeXt blocks) --> 1x1 conv --> [B, out_dim, H, W]
    mask [B, 1, 16H, 16W] --sigmoid--> MaskDownSampler --> [B, 256, H, W]

Parameter names follow the official SAM 2 checkpoints (`memory_encoder.*`).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .common import DropPath, LayerNorm2d


class MaskDownSampler(nn.Module):
    """Strided conv stack that shrinks a mask by `total_stride`, `stride` per step.

    Each step trades spatial resolution for channels (x stride**2), so no information is
    squeezed out early; a final 1x1 conv projects to `embed_dim`. Layout of `encoder`
    (indices are state-dict keys): [conv, LayerNorm2d, act] * num_steps + [1x1 conv].
    """

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 4,
        stride: int = 4,
        padding: int = 0,
        total_stride: int = 16,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        num_steps = int(math.log2(total_stride) // math.log2(stride))
        if stride**num_steps != total_stride:
            raise ValueError(f"total_stride={total_stride} is not a power of stride={stride}")
        self.total_stride = total_stride

        stages: list[nn.Module] = []
        channels = 1
        for _ in range(num_steps):
            next_channels = channels * stride**2
            stages.append(nn.Conv2d(channels, next_channels, kernel_size, stride=stride, padding=padding))
            stages.append(LayerNorm2d(next_channels))
            stages.append(activation())
            channels = next_channels
        stages.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*stages)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        # [B, 1, H*s, W*s] -> [B, embed_dim, H, W] with s = total_stride
        assert masks.dim() == 4 and masks.shape[1] == 1, f"expected [B, 1, H, W] masks, got {tuple(masks.shape)}"
        return self.encoder(masks)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise conv -> LayerNorm -> MLP (4x) -> layer scale, plus residual.

    The pointwise convs are Linear layers applied channels-last (cheaper than 1x1 convs and
    what the checkpoints store as `pwconv1` / `pwconv2`).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        use_dwconv: bool = True,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim if use_dwconv else 1)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # Layer scale starts tiny so each block begins close to the identity.
        self.gamma = (
            nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W]
        residual = x
        x = self.norm(self.dwconv(x))
        x = x.permute(0, 2, 3, 1)  # [B, H, W, C]
        # Under bf16 autocast a permuted view goes through a batched product with the weight copied once
        # per image row; contiguous rows make it one matrix product (and step_many bit-identical to one by
        # one). Only there: in fp32 the contiguous copy changes rounding on some shapes (reverse tracking
        # drifted 1.2e-3 of the logits' spread from the official predictor), so fp32 keeps the view.
        if torch.is_autocast_enabled(x.device.type):
            x = x.contiguous()
        x = self.pwconv2(self.act(self.pwconv1(x)))
        if self.gamma is not None:
            x = x * self.gamma
        x = x.permute(0, 3, 1, 2)  # [B, C, H, W]
        return residual + self.drop_path(x)


class Fuser(nn.Module):
    """`num_layers` independent copies of `layer` applied in sequence, optionally after a 1x1 conv."""

    def __init__(self, layer: nn.Module, num_layers: int, dim: int | None = None, input_projection: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        if input_projection:
            if dim is None:
                raise ValueError("Fuser(input_projection=True) needs dim")
            self.proj: nn.Module = nn.Conv2d(dim, dim, kernel_size=1)
        else:
            self.proj = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W]
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Fuses a frame's image features with its (downsampled) mask logits into a memory feature map."""

    def __init__(
        self,
        out_dim: int,
        mask_downsampler: nn.Module,
        fuser: nn.Module,
        position_encoding: nn.Module,
        in_dim: int = 256,
    ) -> None:
        super().__init__()
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = fuser
        self.position_encoding = position_encoding
        # Memories are stored at a smaller width (64 for the released models) to save bank memory.
        self.out_proj: nn.Module = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(
        self,
        pix_feat: torch.Tensor,  # [B, in_dim, H, W]
        masks: torch.Tensor,  # [B, 1, H*s, W*s] mask logits (or probabilities if skip_mask_sigmoid)
        skip_mask_sigmoid: bool = False,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        assert pix_feat.dim() == 4 and pix_feat.shape[1] == self.in_dim, tuple(pix_feat.shape)
        # Sigmoid maps logits into [0, 1] so predicted masks look like the binary GT masks seen in training.
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        mask_feat = self.mask_downsampler(masks)  # [B, in_dim, H, W]

        pix_feat = pix_feat.to(mask_feat.device)  # image features may have been offloaded to CPU
        assert mask_feat.shape == pix_feat.shape, (
            f"downsampled mask {tuple(mask_feat.shape)} does not match pix_feat {tuple(pix_feat.shape)}"
        )
        x = self.pix_feat_proj(pix_feat) + mask_feat
        x = self.out_proj(self.fuser(x))  # [B, out_dim, H, W]

        pos = self.position_encoding(x).to(x.dtype)  # [B, pos_dim, H, W]
        return {"vision_features": x, "vision_pos_enc": [pos]}
