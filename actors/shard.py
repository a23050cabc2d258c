"""A shard: the image encoder and the trackers of a pipeline in ONE process, so embeddings never
leave the device they were computed on (on a GPU: no host round trip per object and frame).

The executor runs a shard instead of a separate encoder when `ExecutorConfig.colocate` is on (the
default for CUDA). Encoding is then deferred: the scheduler's `Encode` completes at once with a
`DeferredEmbedding` (the frame, not its features), and the first `run` call whose ops need that
frame encodes it here, together with every other uncached frame of the call (frames of all
streams: still one batched forward pass, up to `max_batch_size` frames). Embeddings stay in a
bounded cache of device tensors; a frame needed again after it left the cache (a replay after a
restart) is encoded again from its pixels, which travel with every op that names the frame (by
reference: shared memory on the node, never copied per object).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from masklet.actors.payloads import ModelSpec, Pick, picked
from masklet.actors.runtime import in_actor_process, usable_cores
from masklet.actors.tracker import RefineObject, StepObject, TrackerActor, TrackerOp


@dataclass(frozen=True)
class FrameKey:
    """Stands for a frame's embedding inside a shard: `pixels` picks its frame among the call's refs."""

    stream_id: str
    frame_idx: int
    pixels: Pick


class ShardActor(TrackerActor):
    def __init__(self, spec: ModelSpec, num_threads: int | None = None, cache_frames: int = 64,
                 max_batch_size: int = 8) -> None:
        # One full model copy serves encoder and trackers alike: they share the device.
        threads = num_threads or (usable_cores() if in_actor_process() else None)
        super().__init__(spec, threads, model=spec.build(), max_step_batch=max_batch_size)
        self.cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.cache_frames, self.max_batch_size = cache_frames, max_batch_size
        self.encoder_batch_sizes: dict[int, int] = {}
        self.encoded = 0

    @torch.inference_mode()
    def _prepare(self, ops: Sequence[TrackerOp], refs: Sequence[Any]) -> None:
        wanted: dict[tuple[str, int], FrameKey] = {}
        needed: set[tuple[str, int]] = set()
        for op in ops:
            if isinstance(op, (StepObject, RefineObject)):
                key = picked(op.embedding, refs)
                if isinstance(key, FrameKey):
                    needed.add((key.stream_id, key.frame_idx))
                    if (key.stream_id, key.frame_idx) in self.cache:
                        self.cache.move_to_end((key.stream_id, key.frame_idx))  # in use: evicted last
                    else:
                        wanted[(key.stream_id, key.frame_idx)] = key
        todo = list(wanted.values())
        for start in range(0, len(todo), self.max_batch_size):
            chunk = todo[start:start + self.max_batch_size]
            began = time.perf_counter()
            embeddings = self._encode([picked(k.pixels, refs) for k in chunk])
            elapsed = time.perf_counter() - began
            self.encoder_batch_sizes[len(chunk)] = self.encoder_batch_sizes.get(len(chunk), 0) + 1
            self.stats.observe("masklet_encoder_batch_size", len(chunk))
            self.stats.inc("masklet_frames_encoded_total", len(chunk))
            for key, emb in zip(chunk, embeddings):
                self.stats.observe("masklet_stage_latency_seconds", elapsed, stage="encode")
                self.cache[(key.stream_id, key.frame_idx)] = emb
                self.cache.move_to_end((key.stream_id, key.frame_idx))
            self.encoded += len(chunk)
        while len(self.cache) > max(self.cache_frames, len(needed)):
            self.cache.popitem(last=False)  # the oldest; never one this call needs (they are the newest)

    def _encode(self, frames: list[np.ndarray]) -> list[Any]:
        shapes = {f.shape for f in frames}
        if len(shapes) == 1:
            return list(self.model.encode(np.stack(frames)))
        out: list[Any] = [None] * len(frames)
        for shape in shapes:  # frames of different sizes: one pass per size (no resizing here)
            idx = [i for i, f in enumerate(frames) if f.shape == shape]
            for i, emb in zip(idx, self.model.encode(np.stack([frames[i] for i in idx]))):
                out[i] = emb
        return out

    def _embedding(self, value: Any) -> Any:
        if isinstance(value, FrameKey):
            return self.cache[(value.stream_id, value.frame_idx)]
        return super()._embedding(value)

    def report(self) -> dict:
        out = super().report()
        out["encoder_batch_sizes"] = dict(self.encoder_batch_sizes)
        out["cached_frames"] = len(self.cache)
        out["embedding_device"] = self.device
        return out
