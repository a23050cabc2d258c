"""The encoder actor: one model copy, one forward pass per batch of frames from any streams."""
from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from masklet.actors.payloads import EmbeddingPayload, ModelSpec, actor_pid, in_actor_process, limit_threads
from masklet.monitoring.stats import Stats


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class EncoderActor:
    """Runs `model.encode` on the batches the engine's batcher releases.

    The engine calls `encode(*frames)` with `num_returns=len(frames)`, so each frame's embedding
    becomes its own object: the stream's trackers all read that one copy.
    """

    def __init__(self, spec: ModelSpec, num_threads: int | None = None, to_numpy: bool = True) -> None:
        # Ray exports OMP_NUM_THREADS=1 to every worker with num_cpus=0, so "no cap" (None) would
        # silently mean one thread: in an actor process, None means every core this process may use.
        limit_threads(num_threads or (_usable_cores() if in_actor_process() else None))
        self.spec = spec
        self.model = spec.build()
        self.to_numpy = to_numpy
        self.stats = Stats()
        self.batch_sizes: Counter[int] = Counter()

    @torch.inference_mode()
    def encode(self, *frames: np.ndarray) -> Any:
        start = time.perf_counter()
        embeddings = self._encode_same_size_groups(list(frames))
        elapsed = time.perf_counter() - start
        self.stats.observe("masklet_encoder_batch_size", len(frames))
        self.stats.inc("masklet_frames_encoded_total", len(frames))
        for _ in frames:
            self.stats.observe("masklet_stage_latency_seconds", elapsed, stage="encode")
        out = [EmbeddingPayload.from_embedding(e) if self.to_numpy else e for e in embeddings]
        return out[0] if len(out) == 1 else tuple(out)

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
