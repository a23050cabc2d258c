"""Single-image segmentation with the same model: an image is a one-frame video with no memory.

Matches the official SAM2ImagePredictor: the no-memory embedding is added to the top-level features,
the prompt encoder sees only the given points/box (no padding point when none are given), and the
decoder's masks are upsampled to the image size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .types import FrameEmbedding, Prompt

LOW_RES_CLAMP = 32.0


@dataclass(frozen=True)
class ImageMasks:
    logits: torch.Tensor  # [M, H, W] float at image resolution (mask = logits > 0)
    ious: torch.Tensor  # [M] predicted IoU of each mask
    low_res_logits: torch.Tensor  # [M, S/4, S/4], clamped; feed one back as `mask_input` to refine

    @property
    def masks(self) -> torch.Tensor:
        return self.logits > 0

    def best(self) -> int:
        return int(torch.argmax(self.ious))


@torch.inference_mode()
def segment_image(
    model,
    image: np.ndarray | torch.Tensor | None,
    prompt: Optional[Prompt],
    *,
    multimask: bool = True,
    mask_input: Optional[torch.Tensor] = None,
    embedding: Optional[FrameEmbedding] = None,
    image_size: Optional[tuple[int, int]] = None,
) -> ImageMasks:
    """Segment one uint8 [H, W, 3] RGB image. Pass `embedding` (+ `image_size`) to reuse an encoding.

    mask_input: [1, S/4, S/4] low-res logits from a previous call (e.g. `ImageMasks.low_res_logits[i:i+1]`).
    """
    if embedding is None:
        if image is None:
            raise ValueError("segment_image needs an image or a precomputed embedding")
        image = torch.as_tensor(image)
        if image.dim() != 3 or image.shape[-1] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
        embedding = model.encode(image[None])[0]
        image_size = (int(image.shape[0]), int(image.shape[1]))
    if image_size is None:
        raise ValueError("image_size (H, W) is required with a precomputed embedding")
    h, w = image_size
    emb = embedding.to(model.device)
    S = model.image_size

    points = None
    if prompt is not None:
        prompt.check_inside((h, w))
        if prompt.mask is not None:
            raise ValueError("segment_image takes points/box prompts; pass a low-res mask as mask_input")
        points = model.prompt_points(prompt, (h, w))
    if mask_input is not None:
        mask_input = torch.as_tensor(mask_input, dtype=torch.float32, device=model.device).reshape(1, 1, S // 4, S // 4)
    if points is None and mask_input is None:
        raise ValueError("segment_image needs points, a box or a mask_input")

    with model.compute_context():
        sparse, dense = model.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        image_embed = emb.image_embed[None] + model.no_mem_embed.view(1, -1, 1, 1)
        low_res, ious, _, _ = model.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=[f[None] for f in emb.high_res_feats],
        )
    ious = ious.float()
    low_res = low_res.float()
    logits = F.interpolate(low_res, size=(h, w), mode="bilinear", align_corners=False)
    return ImageMasks(
        logits=logits[0],
        ious=ious[0],
        low_res_logits=low_res.clamp(-LOW_RES_CLAMP, LOW_RES_CLAMP)[0],
    )
