"""Tracker actors: one per (stream, object), owning that object's forward and backward trackers.

Steps arrive strictly in order per direction (the engine guarantees it; the model checks it).
`snapshot()` returns both trackers' `state_dict()`s; a replacement actor built with that snapshot
resumes exactly where the snapshot was taken, and the engine replays the frames after it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from masklet.actors.payloads import ModelSpec, TrackedMask, actor_pid, as_embedding, limit_threads, tracker_class
from masklet.model.types import Prompt
from masklet.monitoring.stats import Stats

FORWARD = "forward"
BACKWARD = "backward"


@dataclass(frozen=True)
class TrackerSnapshot:
    forward_state: dict | None
    forward_frame: int | None    # last frame the forward tracker had stepped
    backward_state: dict | None
    backward_frame: int | None   # last frame the backward tracker had stepped (None: not started)


class TrackerCore:
    """The tracking logic without any actor machinery (shares a model it does not own)."""

    def __init__(self, model: Any, video_size: tuple[int, int], object_id: int,
                 soft_masks: bool = False, snapshot: TrackerSnapshot | None = None) -> None:
        self.model = model
        self.video_size = tuple(video_size)
        self.object_id = object_id
        self.soft_masks = soft_masks
        self.forward = None
        self.backward = None
        self.last = {FORWARD: None, BACKWARD: None}
        if snapshot is not None:
            cls = tracker_class(model)
            if snapshot.forward_state is not None:
                self.forward = cls.from_state(model, snapshot.forward_state)
            if snapshot.backward_state is not None:
                self.backward = cls.from_state(model, snapshot.backward_state)
            self.last = {FORWARD: snapshot.forward_frame, BACKWARD: snapshot.backward_frame}

    @torch.inference_mode()
    def step(self, direction: str, frame_idx: int, embedding: Any, prompt: Prompt | None) -> TrackedMask:
        if direction == FORWARD:
            if self.forward is None:
                self.forward = self.model.new_tracker(video_size=self.video_size)
            tracker = self.forward
        else:
            if self.backward is None:
                raise RuntimeError(f"object {self.object_id}: backward step before start_backward")
            tracker = self.backward
        result = tracker.step(frame_idx, as_embedding(embedding, _device_of(self.model)), prompt)
        self.last[direction] = frame_idx
        return self._tracked(frame_idx, result)

    @torch.inference_mode()
    def refine(self, embedding: Any, prompt: Prompt) -> TrackedMask:
        """Correct the forward tracker's most recent frame with clicks (the model's `refine`); live
        sessions use it for `refine` prompts on the object's latest frame."""
        if self.forward is None or self.last[FORWARD] is None:
            raise RuntimeError(f"object {self.object_id}: refine before the first forward step")
        result = self.forward.refine(as_embedding(embedding, _device_of(self.model)), prompt)
        return self._tracked(self.last[FORWARD], result)

    def _tracked(self, frame_idx: int, result: Any) -> TrackedMask:
        logits = result.logits.detach().float().cpu()
        return TrackedMask(self.object_id, frame_idx, (logits > 0).numpy(), float(result.score), float(result.iou),
                           logits.numpy() if self.soft_masks else None)

    def start_backward(self) -> None:
        """Branch the backward tracker off the forward one (the engine calls this once the forward
        tracker has seen the frames after the first prompt that seed the backward memory)."""
        if self.forward is None:
            raise RuntimeError(f"object {self.object_id}: start_backward before the first forward step")
        self.backward = self.forward.reverse_tracker()

    def snapshot(self) -> TrackerSnapshot:
        return TrackerSnapshot(
            None if self.forward is None else _detached(self.forward.state_dict()), self.last[FORWARD],
            None if self.backward is None else _detached(self.backward.state_dict()), self.last[BACKWARD],
        )

    def memory_bytes(self) -> int:
        return sum(t.memory_bytes() for t in (self.forward, self.backward) if t is not None)


def _device_of(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except (StopIteration, AttributeError, TypeError):
        return "cpu"


def _detached(state: Any) -> Any:
    """A deep copy on the host, so the snapshot does not alias tensors the tracker mutates later."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, np.ndarray):
        return state.copy()
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_detached(v) for v in state)
    return state


class TrackerActor:
    def __init__(self, spec: ModelSpec, video_size: tuple[int, int], object_id: int, soft_masks: bool = False,
                 snapshot: TrackerSnapshot | None = None, num_threads: int | None = 1) -> None:
        limit_threads(num_threads)
        self.core = TrackerCore(spec.build(with_image_encoder=False), video_size, object_id, soft_masks, snapshot)
        self.stats = Stats()

    def step(self, direction: str, frame_idx: int, embedding: Any, prompt: Prompt | None = None) -> TrackedMask:
        start = time.perf_counter()
        out = self.core.step(direction, frame_idx, embedding, prompt)
        self.stats.observe("masklet_stage_latency_seconds", time.perf_counter() - start, stage="track")
        return out

    def refine(self, embedding: Any, prompt: Prompt) -> TrackedMask:
        start = time.perf_counter()
        out = self.core.refine(embedding, prompt)
        self.stats.observe("masklet_stage_latency_seconds", time.perf_counter() - start, stage="track")
        return out

    def start_backward(self) -> None:
        self.core.start_backward()

    def snapshot(self) -> TrackerSnapshot:
        return self.core.snapshot()

    def stats_snapshot(self):
        self.stats.set("masklet_tracker_memory_bank_bytes", self.core.memory_bytes())
        self.stats.set("masklet_active_objects", 1)
        return self.stats.snapshot()

    def pid(self) -> int:
        return actor_pid()
