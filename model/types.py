"""Small frozen value types exchanged between the model and the pipeline.

Everything here is plain data: tensors/arrays plus scalars. No module references, so the types
can cross process boundaries (Ray object store) without dragging the model along.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FrameEmbedding:
    """Image-encoder output for ONE frame, shared by every tracker of that frame's stream.

    Shapes (S = model image_size):
      high_res_feats[0]: [32, S/4, S/4]   (already passed through the decoder's conv_s0)
      high_res_feats[1]: [64, S/8, S/8]   (already passed through the decoder's conv_s1)
      image_embed:       [256, S/16, S/16] (FPN top level; memory attention conditions this)
    The positional encoding of the top level depends only on S, so trackers cache it instead of
    shipping it with every frame.
    """

    high_res_feats: tuple[torch.Tensor, torch.Tensor]
    image_embed: torch.Tensor

    @property
    def image_size(self) -> int:
        return int(self.image_embed.shape[-1]) * 16

    def to(self, device: torch.device | str) -> "FrameEmbedding":
        return FrameEmbedding(
            high_res_feats=(self.high_res_feats[0].to(device), self.high_res_feats[1].to(device)),
            image_embed=self.image_embed.to(device),
        )

    def nbytes(self) -> int:
        tensors = (*self.high_res_feats, self.image_embed)
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Prompt:
    """Prompt for one object on one frame, in VIDEO pixel coordinates.

    points: [N, 2] (x, y); labels: [N] with 1 = positive click, 0 = negative click.
    box: [x0, y0, x1, y1]. mask: bool [H, W] at video resolution.
    A mask prompt cannot be combined with points or a box (as in the official predictor).
    """

    points: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        pts = None if self.points is None else np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
        lbl = None if self.labels is None else np.asarray(self.labels, dtype=np.int64).reshape(-1)
        box = None if self.box is None else np.asarray(self.box, dtype=np.float32).reshape(-1)
        mask = None if self.mask is None else np.asarray(self.mask).astype(bool)
        if pts is not None and lbl is None:
            lbl = np.ones(len(pts), dtype=np.int64)
        if lbl is not None and (pts is None or len(lbl) != len(pts)):
            raise ValueError(f"labels must match points: {0 if pts is None else len(pts)} points, {len(lbl)} labels")
        if lbl is not None and not np.isin(lbl, (0, 1)).all():
            raise ValueError(f"labels must be 1 (positive) or 0 (negative), got {sorted(set(lbl.tolist()))}")
        if box is not None:
            if box.shape != (4,):
                raise ValueError(f"box must be [x0, y0, x1, y1], got shape {box.shape}")
            if box[2] < box[0] or box[3] < box[1]:
                raise ValueError(f"box must have x1 >= x0 and y1 >= y0, got {box.tolist()}")
        if mask is not None:
            if mask.ndim != 2:
                raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
            if pts is not None or box is not None:
                raise ValueError("a mask prompt cannot be combined with points or a box")
        if pts is None and box is None and mask is None:
            raise ValueError("a prompt needs points, a box or a mask")
        object.__setattr__(self, "points", pts)
        object.__setattr__(self, "labels", lbl)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "mask", mask)

    def check_inside(self, video_size: tuple[int, int]) -> None:
        """Raise ValueError naming the offending coordinate if the prompt leaves the frame."""
        h, w = video_size
        coords = []
        if self.points is not None:
            coords += [("point", p) for p in self.points]
        if self.box is not None:
            coords += [("box corner", self.box[:2]), ("box corner", self.box[2:])]
        for what, (x, y) in coords:
            if not (0 <= x <= w and 0 <= y <= h):
                raise ValueError(f"{what} ({x:g}, {y:g}) is outside the {w}x{h} frame")
        if self.mask is not None and tuple(self.mask.shape) != (h, w):
            raise ValueError(f"mask is {self.mask.shape[1]}x{self.mask.shape[0]}, frame is {w}x{h}")


@dataclass(frozen=True, init=False)
class MaskResult:
    """One object's output on one frame, kept small: the mask stays at the model's low resolution.

    low_res_logits: float32 [1, S/4, S/4], what the official predictor stores as pred_masks.
    video_size: (H, W) of the video; `logits` upsamples to it on first access (then cached), so
                a caller that never asks for full resolution never pays for it.
    score: object-presence logit (> 0 means the object is judged present).
    iou: the mask decoder's IoU estimate for the returned mask.
    is_conditioning: the frame is one of the object's conditioning (prompted or corrected) frames.

    `logits=` may be given explicitly (float32 [H, W]) by models whose full-resolution logits are not
    a bilinear upsampling of `low_res_logits` (plug-in models, test fakes); video_size then defaults
    to its shape.
    """

    frame_idx: int
    low_res_logits: torch.Tensor
    score: float
    iou: float
    video_size: tuple[int, int]
    is_conditioning: bool = False

    def __init__(
        self,
        frame_idx: int,
        low_res_logits: torch.Tensor,
        score: float,
        iou: float,
        video_size: Optional[tuple[int, int]] = None,
        is_conditioning: bool = False,
        *,
        logits: Optional[torch.Tensor] = None,
    ) -> None:
        if video_size is None:
            if logits is None:
                raise ValueError("MaskResult needs video_size (or explicit full-resolution logits)")
            video_size = tuple(logits.shape[-2:])
        video_size = (int(video_size[0]), int(video_size[1]))
        if logits is not None and tuple(logits.shape) != video_size:
            raise ValueError(f"logits are {tuple(logits.shape)}, video_size is {video_size}")
        for name, value in (("frame_idx", int(frame_idx)), ("low_res_logits", low_res_logits),
                            ("score", float(score)), ("iou", float(iou)), ("video_size", video_size),
                            ("is_conditioning", bool(is_conditioning))):
            object.__setattr__(self, name, value)
        if logits is not None:
            self.__dict__["logits"] = logits  # pre-fills the cached property below

    @cached_property
    def logits(self) -> torch.Tensor:
        """float32 [H, W] at video resolution (mask = logits > 0): bilinear, align_corners=False."""
        return F.interpolate(self.low_res_logits[None].float(), size=self.video_size, mode="bilinear",
                             align_corners=False)[0, 0]

    @property
    def mask(self) -> torch.Tensor:
        return self.logits > 0

    @property
    def present(self) -> bool:
        return self.score > 0
