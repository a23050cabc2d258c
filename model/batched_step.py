"""Many objects, one forward pass: step trackers of any streams together, grouped by memory layout.

`step_many(requests)` gives exactly the results of `r.tracker.step(r.frame_idx, r.embedding, r.prompt)`
run for each request in order. Tracking steps (no prompt) are grouped by what memory attention sees:
the number of spatial-memory tokens and of object-pointer tokens. Each group runs memory attention,
the mask decoder and the memory encoder once, with batch = group size. Grouping by shape rather than
padding keeps every number the same as one-by-one stepping (checked in tests/model/test_batched_step.py:
bit-identical on this CPU). Prompted steps are rare and run one by one.

Objects may come from different streams: each request carries its own embedding, video size and
frame index. All trackers must belong to one model (one image size).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .types import FrameEmbedding, MaskResult, Prompt

if TYPE_CHECKING:
    from .tracker import ObjectTracker

# Below this image size the memory encoder's and decoder's convolutions are so small that oneDNN picks
# batch-dependent algorithms (measured: 64 and 128 px round differently at B > 1, 256 to 1024 px do
# not), so smaller models step their objects one at a time. Nobody tracks below 256 px for speed.
MIN_BATCHED_IMAGE_SIZE = 256


@dataclass(frozen=True)
class StepRequest:
    """One object's step: what `tracker.step(frame_idx, embedding, prompt)` would be given."""

    tracker: "ObjectTracker"
    frame_idx: int
    embedding: FrameEmbedding
    prompt: Optional[Prompt] = None


class StepRequestError(ValueError):
    """A request failed the checks `ObjectTracker.step` makes; `request_index` says which one.

    step_many checks every request before running any, so when this is raised no tracker has changed.
    """

    def __init__(self, message: str, request_index: int) -> None:
        super().__init__(message)
        self.request_index = request_index


@dataclass(frozen=True)
class MemoryInputs:
    """What memory attention reads for one object on one frame (batch 1)."""

    tokens: torch.Tensor  # [M, 1, Cm] spatial-memory tokens, then object-pointer tokens
    positions: torch.Tensor  # [M, 1, Cm] their positional encodings
    num_pointer_tokens: int  # the last num_pointer_tokens of M are object-pointer tokens

    @property
    def layout(self) -> tuple[int, int]:
        """(memory tokens, pointer tokens): the shapes memory attention sees. Equal layouts batch together."""
        return int(self.tokens.shape[0]), self.num_pointer_tokens


@dataclass(frozen=True)
class TrackingItem:
    """A checked tracking step waiting for its group's forward pass (embedding already on the device)."""

    tracker: "ObjectTracker"
    frame_idx: int
    embedding: FrameEmbedding


def track_group(model, items: Sequence[TrackingItem]) -> list[MaskResult]:
    """Tracking steps of distinct trackers, grouped by memory layout, each group one forward pass.

    The caller has run `check_step` on every item and holds inference mode + the model's compute context.
    """
    inputs = [item.tracker.memory_inputs(item.frame_idx) for item in items]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, mem in enumerate(inputs):
        groups[mem.layout].append(i)
    batchable = model.image_size >= MIN_BATCHED_IMAGE_SIZE
    results: list[Optional[MaskResult]] = [None] * len(items)
    for indices in groups.values():
        for batch in [indices] if batchable else [[i] for i in indices]:
            for i, result in zip(batch, _track_batch(model, [items[i] for i in batch], [inputs[i] for i in batch])):
                results[i] = result
    return results  # type: ignore[return-value]


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[X, ...] per object -> [B, X, ...]; a single object keeps its tensor's own layout (a view, no copy)."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def _own(t: torch.Tensor, i: int, batch: int) -> torch.Tensor:
    """Row i of a batch, as a tensor that owns its storage: a view would keep (and serialise) the whole batch."""
    return t if batch == 1 else t[i : i + 1].clone()


def _track_batch(model, items: Sequence[TrackingItem], inputs: Sequence[MemoryInputs]) -> list[MaskResult]:
    """One forward pass for B objects whose memory layouts are equal."""
    B = len(items)
    image_embed = _stack([item.embedding.image_embed for item in items])  # [B, C, h, w]
    high_res = [_stack([item.embedding.high_res_feats[level] for item in items]) for level in (0, 1)]
    memory = torch.cat([mem.tokens for mem in inputs], dim=1)  # [M, B, Cm]
    positions = torch.cat([mem.positions for mem in inputs], dim=1)  # [M, B, Cm]
    conditioned = model.condition_on_memory(image_embed, memory, positions, inputs[0].num_pointer_tokens)
    dec = model.decode(conditioned, high_res, None, None, None, multimask=True)
    memories = model.encode_memory(image_embed, dec.high_res_logits, dec.presence_logit, binarize=False)
    return [
        item.tracker.commit_tracking(
            item.frame_idx,
            memory=_own(memories, i, B),  # bf16 [1, Cm, h, w]
            object_pointer=_own(dec.object_pointer, i, B),  # [1, C]
            presence_logit=_own(dec.presence_logit, i, B),  # [1, 1]
            low_res=_own(dec.low_res_logits, i, B),  # [1, 1, S/4, S/4]
            iou=_own(dec.iou, i, B),  # [1]
        )
        for i, item in enumerate(items)
    ]


@torch.inference_mode()
def step_many(requests: Sequence[StepRequest]) -> list[MaskResult]:
    """Step many objects at once; results in request order, equal to stepping them one by one.

    At most one request per tracker (send several frames of one object as successive calls). Every
    request is checked first, with the messages `ObjectTracker.step` uses, so a StepRequestError
    (a ValueError) leaves every tracker unchanged and names the offending request.
    """
    if not requests:
        return []
    model = requests[0].tracker.model
    seen: dict[int, int] = {}
    for i, r in enumerate(requests):
        if r.tracker.model is not model:
            raise StepRequestError(f"request {i}: its tracker belongs to another model than request 0's", i)
        if id(r.tracker) in seen:
            raise StepRequestError(
                f"request {i}: the tracker of request {seen[id(r.tracker)]} appears twice; send one request "
                "per tracker per call (the next frame goes in the next call)", i)
        seen[id(r.tracker)] = i
        try:
            r.tracker.check_step(int(r.frame_idx), r.embedding, r.prompt)
        except ValueError as err:
            raise StepRequestError(str(err), i) from err

    results: list[Optional[MaskResult]] = [None] * len(requests)
    tracking: list[int] = []
    with model.compute_context():
        for i, r in enumerate(requests):
            if r.prompt is None:
                tracking.append(i)
            else:  # rare: one by one
                results[i] = r.tracker.step(r.frame_idx, r.embedding, r.prompt)
        items = [TrackingItem(requests[i].tracker, int(requests[i].frame_idx), requests[i].embedding.to(model.device))
                 for i in tracking]
        for i, result in zip(tracking, track_group(model, items)):
            results[i] = result
    return results  # type: ignore[return-value]
