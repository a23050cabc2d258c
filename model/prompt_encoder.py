"""SAM prompt encoder: points/boxes -> sparse tokens, mask logits -> dense embedding.

Point labels: -1 padding ("not a point"), 0 negative click, 1 positive click, 2 box top-left,
3 box bottom-right. Coordinates are in input-image pixels (x, y).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .common import LayerNorm2d

PAD_LABEL = -1
NUM_POINT_KINDS = 4  # negative, positive, box corner 1, box corner 2


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of 2-D coordinates through a fixed random Gaussian projection."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def encode_unit_coords(self, coords: Tensor) -> Tensor:
        """coords [..., 2] in [0, 1] (x, y) -> [..., 2 * num_pos_feats] as (sin, cos)."""
        centred = 2 * coords - 1  # to [-1, 1]
        phases = 2 * math.pi * (centred @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(phases), torch.cos(phases)], dim=-1)

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Encoding of every cell centre of an (h, w) grid -> [C, h, w]."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)  # [h, w, 2]
        return self.encode_unit_coords(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: Tensor, image_size: tuple[int, int]) -> Tensor:
        """coords [B, N, 2] in pixels (x, y) of an image of size (H, W) -> [B, N, C]."""
        image_h, image_w = image_size
        unit = torch.stack([coords_input[..., 0] / image_w, coords_input[..., 1] / image_h], dim=-1)
        return self.encode_unit_coords(unit.float())


class PromptEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        """
        embed_dim: width of the prompt tokens and dense embedding.
        image_embedding_size: (H, W) of the image embedding the decoder attends to.
        input_image_size: (H, W) of the padded encoder input; point coordinates refer to it.
        mask_in_chans: hidden channels of the mask downscaling convs.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        self.num_point_embeddings = NUM_POINT_KINDS
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(NUM_POINT_KINDS))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        # Mask prompts come at 4x the embedding resolution; two stride-2 convs bring them down.
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        """Positional encoding of the image-embedding grid, [1, embed_dim, H, W]."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """coords [B, N, 2] pixels, labels [B, N] -> tokens [B, N (+1 if pad), C]."""
        assert coords.shape[:2] == labels.shape and coords.shape[-1] == 2
        coords = coords + 0.5  # pixel centre
        if pad:
            # Without a box, a padding point is appended (matches how SAM was trained).
            batch = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(batch, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((batch, 1), PAD_LABEL)], dim=1)
        tokens = self.pe_layer.forward_with_coords(coords, self.input_image_size)  # [B, N, C]

        kind_table = torch.cat([emb.weight for emb in self.point_embeddings], dim=0)  # [4, C]
        is_kind = (labels >= 0) & (labels < NUM_POINT_KINDS)
        kind_index = torch.where(is_kind, labels, torch.zeros_like(labels)).long()
        tokens = torch.where(is_kind.unsqueeze(-1), tokens + kind_table[kind_index], tokens)
        # Padding points carry no position at all, only the learned "not a point" token.
        pad_token = self.not_a_point_embed.weight.expand_as(tokens)
        return torch.where((labels == PAD_LABEL).unsqueeze(-1), pad_token, tokens)

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """boxes [B, 4] (x0, y0, x1, y1) pixels -> two corner tokens [B, 2, C]."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        tokens = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_kinds = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)  # [2, C]
        return tokens + corner_kinds

    def embed_masks(self, masks: Tensor) -> Tensor:
        """masks [B, 1, 4H, 4W] logits -> [B, C, H, W]."""
        return self.mask_downscaling(masks)

    @staticmethod
    def batch_size_of(points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, masks: Tensor | None) -> int:
        for prompt in (points[0] if points is not None else None, boxes, masks):
            if prompt is not None:
                return prompt.shape[0]
        return 1

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        masks: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Returns sparse [B, N, C] (points then box corners) and dense [B, C, H, W] embeddings."""
        batch = self.batch_size_of(points, boxes, masks)
        device = self.point_embeddings[0].weight.device
        sparse_parts = [torch.empty((batch, 0, self.embed_dim), device=device)]
        if points is not None:
            coords, labels = points
            sparse_parts.append(self.embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            sparse_parts.append(self.embed_boxes(boxes))
        sparse = torch.cat(sparse_parts, dim=1)

        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense
