"""A model with SAM 2's API and no compute: for measuring a pipeline's own overhead, and a minimal
example of the plug-in contract (`masklet.model.protocols`).

    masklet segment clip.mp4 --point 640,360 --out out/ --model-factory masklet.model.null_model:build_null_model

`encode` hands out zero feature maps of the real shapes (so moving them costs what it costs with
SAM 2); a tracker's `step` returns a fixed low-resolution blob around its first prompt (so
publishing does real RLE work on a mask of a realistic size). Nothing is learned or computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .types import FrameEmbedding, MaskResult, Prompt


@dataclass(frozen=True)
class NullConfig:
    name: str = "null"


class NullModel:
    def __init__(self, name: str = "null", image_size: int = 1024, blob_fraction: float = 0.2) -> None:
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
        self.config = NullConfig(name)
        self.image_size = image_size
        self.blob_fraction = blob_fraction  # blob diameter as a fraction of the frame's shorter side
        s = image_size
        self._features = (torch.zeros(32, s // 4, s // 4), torch.zeros(64, s // 8, s // 8), torch.zeros(256, s // 16, s // 16))

    def eval(self) -> "NullModel":
        return self

    def encode(self, frames) -> list[FrameEmbedding]:
        count = len(frames)
        # Fresh tensors per frame, as a real encoder returns them (a view of one buffer would alias).
        return [FrameEmbedding((self._features[0].clone(), self._features[1].clone()), self._features[2].clone())
                for _ in range(count)]

    def new_tracker(self, video_size: tuple[int, int], num_frames: Optional[int] = None, *,
                    reverse: bool = False) -> "NullTracker":
        return NullTracker(self, video_size, reverse=reverse)

    def restore_tracker(self, state: dict) -> "NullTracker":
        tracker = NullTracker(self, tuple(state["video_size"]), reverse=bool(state["reverse"]))
        tracker.centre = None if state["centre"] is None else tuple(state["centre"])
        tracker.last_frame_idx = state["last_frame_idx"]
        return tracker

    def step_many(self, requests: Sequence) -> list[MaskResult]:
        return [r.tracker.step(r.frame_idx, r.embedding, r.prompt) for r in requests]


class NullTracker:
    def __init__(self, model: NullModel, video_size: tuple[int, int], *, reverse: bool = False) -> None:
        self.model, self.video_size, self.reverse = model, (int(video_size[0]), int(video_size[1])), reverse
        self.centre: Optional[tuple[float, float]] = None   # (x, y) as fractions of the frame
        self.last_frame_idx: Optional[int] = None
        self._low: Optional[torch.Tensor] = None

    def step(self, frame_idx: int, embedding: FrameEmbedding, prompt: Optional[Prompt] = None) -> MaskResult:
        if prompt is not None:
            self.centre = _centre_of(prompt, self.video_size)
            self._low = None
        if self.centre is None:
            raise ValueError(f"frame {frame_idx}: this object has no prompt yet; give one with its first step")
        self.last_frame_idx = int(frame_idx)
        return MaskResult(frame_idx, self._blob(), 1.0, 0.9, self.video_size, prompt is not None)

    def refine(self, embedding: FrameEmbedding, prompt: Prompt) -> MaskResult:
        return self.step(self.last_frame_idx if self.last_frame_idx is not None else 0, embedding, prompt)

    def reverse_tracker(self) -> "NullTracker":
        tracker = NullTracker(self.model, self.video_size, reverse=True)
        tracker.centre, tracker.last_frame_idx = self.centre, self.last_frame_idx
        return tracker

    def _blob(self) -> torch.Tensor:
        if self._low is None:  # computed once per prompt: steps stay free
            n = self.model.image_size // 4
            h, w = self.video_size
            ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) / n
            cx, cy = self.centre
            radius = self.model.blob_fraction / 2 * min(h, w)
            dist = np.hypot((xs - cx) * w, (ys - cy) * h)
            self._low = torch.from_numpy(((radius - dist) / radius * 8.0).astype(np.float32))[None]
        return self._low

    def state_dict(self) -> dict:
        return {"video_size": list(self.video_size), "reverse": self.reverse,
                "centre": None if self.centre is None else list(self.centre), "last_frame_idx": self.last_frame_idx}

    def memory_bytes(self) -> int:
        return 0


def _centre_of(prompt: Prompt, video_size: tuple[int, int]) -> tuple[float, float]:
    h, w = video_size
    if prompt.box is not None:
        x, y = (prompt.box[0] + prompt.box[2]) / 2, (prompt.box[1] + prompt.box[3]) / 2
    elif prompt.points is not None:
        x, y = prompt.points[0]
    else:
        ys, xs = np.nonzero(prompt.mask)
        x, y = (float(xs.mean()), float(ys.mean())) if xs.size else (w / 2, h / 2)
    return float(x) / w, float(y) / h


def build_null_model(name: str = "null", checkpoint=None, image_size: int = 1024, device: str = "cpu",
                     **kwargs) -> NullModel:
    """The factory (`module:function`): checkpoint, device and precision are accepted and ignored."""
    return NullModel(name, image_size)
