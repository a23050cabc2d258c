"""Image encoder = Hiera trunk + FPN neck. Parameter names match the official checkpoints
(image_encoder.trunk.*, image_encoder.neck.convs.N.conv.{weight,bias})."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FpnNeck(nn.Module):
    """Feature-pyramid neck without output convs.

    Projects every trunk level to d_model with a lateral conv; for levels in fpn_top_down_levels it adds the
    2x-upsampled output of the next coarser level. Input: trunk outputs highest resolution first; output:
    (features, position encodings), both lists in the same order, each [B, d_model, H_i, W_i].
    """

    def __init__(
        self,
        position_encoding: nn.Module,
        d_model: int,
        backbone_channel_list: list[int],
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        fpn_interp_model: str = "bilinear",
        fuse_type: str = "sum",
        fpn_top_down_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.position_encoding = position_encoding
        self.d_model = d_model
        # Lowest resolution (most channels) first, i.e. convs[0] serves the coarsest trunk level.
        self.backbone_channel_list = backbone_channel_list
        self.convs = nn.ModuleList()
        for in_channels in backbone_channel_list:
            lateral = nn.Sequential()
            lateral.add_module(
                "conv",
                nn.Conv2d(in_channels, d_model, kernel_size=kernel_size, stride=stride, padding=padding),
            )
            self.convs.append(lateral)
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type
        self.fpn_top_down_levels = list(range(len(self.convs)) if fpn_top_down_levels is None else fpn_top_down_levels)

    def forward(self, xs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        num_levels = len(self.convs)
        assert len(xs) == num_levels, (len(xs), num_levels)
        features: list[Tensor | None] = [None] * num_levels
        positions: list[Tensor | None] = [None] * num_levels

        coarser: Tensor | None = None  # fused output of the previous (coarser) level
        for level in reversed(range(num_levels)):  # coarsest -> finest
            lateral = self.convs[num_levels - 1 - level](xs[level])  # [B, d_model, H_l, W_l]
            if coarser is not None and level in self.fpn_top_down_levels:
                upsampled = F.interpolate(
                    coarser.to(dtype=torch.float32),
                    scale_factor=2.0,
                    mode=self.fpn_interp_model,
                    align_corners=None if self.fpn_interp_model == "nearest" else False,
                    antialias=False,
                )
                fused = lateral + upsampled
                if self.fuse_type == "avg":
                    fused = fused / 2
            else:
                fused = lateral
            coarser = fused
            features[level] = fused
            positions[level] = self.position_encoding(fused).to(fused.dtype)
        return features, positions


class ImageEncoder(nn.Module):
    """trunk -> neck; `scalp` drops that many of the lowest-resolution levels.

    forward([B, 3, S, S]) -> {"vision_features": [B, d_model, H, W] (lowest kept resolution),
    "vision_pos_enc": list of [B, d_model, H_i, W_i], "backbone_fpn": list of [B, d_model, H_i, W_i]},
    lists ordered highest resolution first.
    """

    def __init__(self, trunk: nn.Module, neck: nn.Module, scalp: int = 0) -> None:
        super().__init__()
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp
        assert list(trunk.channel_list) == list(neck.backbone_channel_list), (
            f"trunk channels {trunk.channel_list} do not match neck channels {neck.backbone_channel_list}"
        )

    def forward(self, sample: Tensor) -> dict[str, Tensor | list[Tensor]]:
        features, positions = self.neck(self.trunk(sample))
        if self.scalp > 0:
            features, positions = features[: -self.scalp], positions[: -self.scalp]
        return {
            "vision_features": features[-1],
            "vision_pos_enc": positions,
            "backbone_fpn": features,
        }
