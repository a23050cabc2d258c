"""The plug-in contract: what the pipeline needs from a model, so a SAM 2-compatible model of your own fits.

The pipeline builds its model through a factory named "module:function" (Masklet's own is
`masklet.model:build_model`). The function is called as

    build(name, checkpoint, image_size, device, **kwargs) -> SegmentationModel

and must return an object satisfying `SegmentationModel` below; its trackers must satisfy `Tracker`.
The value types it exchanges are Masklet's own (masklet.model.types): `FrameEmbedding`, `Prompt`,
`MaskResult`. Embeddings cross process boundaries: keep their tensors float32 (they travel as numpy,
which has no bfloat16) and their shapes as documented on FrameEmbedding.

SegmentationModel (required):
  config                 an object with at least `.name` (str), the variant name used in snapshots
  image_size             int, the square input resolution; FrameEmbedding.image_size must equal it
  encode(frames)         uint8 [B, H, W, 3] RGB frames of any streams -> list of B FrameEmbedding
  new_tracker(video_size, num_frames=None, *, reverse=False) -> Tracker for one object of one stream
  restore_tracker(state) -> Tracker resumed from `tracker.state_dict()` (plain tensors/ints/lists)

BatchedStepModel (optional): additionally
  step_many(requests)    list of StepRequest -> list of MaskResult, equal to stepping each request's
                         tracker one by one (at most one request per tracker per call). The pipeline
                         checks `isinstance(model, BatchedStepModel)` and falls back to one
                         `tracker.step(...)` per object when the model lacks it.

Tracker (required), one object of one stream:
  step(frame_idx, embedding, prompt=None) -> MaskResult  frames in increasing order (decreasing for a
                         reverse tracker); the first step needs a prompt; a prompt on a new frame
                         makes it a conditioning frame
  refine(embedding, prompt) -> MaskResult  correct the most recently stepped frame (`prompt` holds all
                         clicks wanted on that frame)
  reverse_tracker()      a tracker that continues backwards from the first prompted frame
  state_dict()           snapshot readable by torch.load(weights_only=True)
  memory_bytes()         bytes held by the object's memory (for monitoring; must stay flat)
  last_frame_idx         the most recently stepped frame, None before the first step

What the pipeline publishes from a MaskResult: the mask is bilinear(low_res_logits -> video_size,
align_corners=False) > 0, computed by the publisher actors from the low-resolution logits (they never
see full-resolution tensors). So a plug-in model must express its masks as low-resolution logits
([1, h, w]); MaskResult's explicit `logits=` serves in-process callers only and is not what
the pipeline publishes.

The protocols are runtime_checkable, so `isinstance(obj, SegmentationModel)` checks that the members
exist (not their signatures; tests/model/test_model_protocols.py compares those for Masklet's own model).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .batched_step import StepRequest
from .types import FrameEmbedding, MaskResult, Prompt


@runtime_checkable
class Tracker(Protocol):
    last_frame_idx: Optional[int]

    def step(self, frame_idx: int, embedding: FrameEmbedding, prompt: Optional[Prompt] = None) -> MaskResult: ...

    def refine(self, embedding: FrameEmbedding, prompt: Prompt) -> MaskResult: ...

    def reverse_tracker(self) -> "Tracker": ...

    def state_dict(self) -> dict: ...

    def memory_bytes(self) -> int: ...


@runtime_checkable
class SegmentationModel(Protocol):
    config: Any  # has .name
    image_size: int

    def encode(self, frames: torch.Tensor | np.ndarray) -> list[FrameEmbedding]: ...

    def new_tracker(self, video_size: tuple[int, int], num_frames: Optional[int] = None, *,
                    reverse: bool = False) -> Tracker: ...

    def restore_tracker(self, state: dict) -> Tracker: ...


@runtime_checkable
class BatchedStepModel(SegmentationModel, Protocol):
    def step_many(self, requests: Sequence[StepRequest]) -> list[MaskResult]: ...
