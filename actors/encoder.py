"""The encoder actor: one model copy, one forward pass per batch of frames from any streams.

`encode(groups, *values)` takes its frames as groups of `Pick`s over its arguments (`ArgLayout`: a
decoder read's pack is one argument for all of its frames; the executor makes one group per
stream) and returns 1 + len(groups) values: a tuple with one status per frame, groups in order
(None, or why it has no embedding), then each group's embeddings packed in one tuple. One object
per stream and call rather than one per frame (each object costs the raylet, this process and every
reader work of their own), and per stream so that a pack is freed with its stream's frames: a
slow stream never keeps another stream's embeddings alive. Every tracker of a frame's stream reads
the one copy by reference. A `FrameFailure` in (a live frame that did not decode) passes through as
its own status and value, and the other frames of the batch are encoded.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from masklet.actors.payloads import EmbeddingPayload, FrameFailure, ModelSpec, Pick, picked
from masklet.actors.runtime import actor_pid, in_actor_process, limit_threads, usable_cores
from masklet.monitoring.stats import Stats


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class EncoderActor:
    """Runs `model.encode` on the batches the executor's batcher releases."""

    def __init__(self, spec: ModelSpec, num_threads: int | None = None, to_numpy: bool = True) -> None:
        # Ray exports OMP_NUM_THREADS=1 to every worker with num_cpus=0, so "no cap" (None) would
        # silently mean one thread: in an actor process, None means every core this process may use.
        limit_threads(num_threads or (usable_cores() if in_actor_process() else None))
        self.spec = spec
        self.model = spec.build()
        self.to_numpy = to_numpy
        self.stats = Stats()
        self.batch_sizes: Counter[int] = Counter()

    @torch.inference_mode()
    def encode(self, groups: tuple[tuple[Pick, ...], ...], *values: Any) -> tuple:
        start = time.perf_counter()
        frames = [picked(p, values) for group in groups for p in group]
        good = [i for i, f in enumerate(frames) if not isinstance(f, FrameFailure)]
        statuses: list[Any] = [f.reason if isinstance(f, FrameFailure) else None for f in frames]
        out: list[Any] = list(frames)
        if good:
            embeddings = self._encode_same_size_groups([frames[i] for i in good])
            for i, emb in zip(good, embeddings):
                out[i] = EmbeddingPayload.from_embedding(emb) if self.to_numpy else emb
            elapsed = time.perf_counter() - start
            self.stats.observe("masklet_encoder_batch_size", len(good))
            self.stats.inc("masklet_frames_encoded_total", len(good))
            for _ in good:
                self.stats.observe("masklet_stage_latency_seconds", elapsed, stage="encode")
        packs, begin = [], 0
        for group in groups:
            packs.append(tuple(out[begin:begin + len(group)]))
            begin += len(group)
        return (tuple(statuses), *packs)

    def _encode_same_size_groups(self, frames: list[np.ndarray]) -> list:
        """One forward pass when all frames share a size (the usual case); else one per size.

        Resizing frames to a common size here would change the model's input, so frames of
        different sources go through the model's own preprocessing, batched when it exposes it.
        """
        shapes = {f.shape for f in frames}
        if len(shapes) == 1:
            self.batch_sizes[len(frames)] += 1
            return list(self.model.encode(np.stack(frames)))
        preprocess = getattr(self.model, "preprocess", None)
        if preprocess is not None:
            batch = torch.cat([preprocess(torch.from_numpy(np.ascontiguousarray(f))[None]) for f in frames])
            self.batch_sizes[len(frames)] += 1
            return list(self.model.encode(batch))
        out: list = [None] * len(frames)
        for shape in shapes:
            idx = [i for i, f in enumerate(frames) if f.shape == shape]
            self.batch_sizes[len(idx)] += 1
            for i, emb in zip(idx, self.model.encode(np.stack([frames[i] for i in idx]))):
                out[i] = emb
        return out

    def report(self) -> dict:
        return {"batch_sizes": dict(self.batch_sizes), "device": str(self.spec.device)}

    def stats_snapshot(self):
        return self.stats.snapshot()

    def pid(self) -> int:
        return actor_pid()
