"""Values the actors exchange with the engine, and how a model is rebuilt inside an actor process.

Everything that crosses an actor boundary here is a small frozen dataclass of numpy arrays and
scalars. Ray moves numpy arrays through its shared-memory object store without copying them per
reader, so an embedding put once is read by every tracker of its stream from the same memory.

torch is imported lazily: decoder and publisher processes never touch a tensor, and importing torch
costs each of them about 1.5 CPU-seconds at start-up (on a 2-core machine, time the encoder loses).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from masklet.model.types import FrameEmbedding


@dataclass(frozen=True)
class ModelSpec:
    """How to build the model in any process; random weights are seeded so every copy agrees."""

    name: str = "sam2.1_hiera_tiny"
    checkpoint: str | None = None  # None: random weights; otherwise a local file path
    image_size: int = 1024
    device: str = "cpu"
    factory: str = "masklet.model:build_model"  # "module:function"; tests point this at a fake
    seed: int = 0

    def build(self, with_image_encoder: bool = True) -> Any:
        module_name, func_name = self.factory.split(":")
        build = getattr(importlib.import_module(module_name), func_name)
        import torch

        torch.manual_seed(self.seed)
        kwargs = {}
        if not with_image_encoder and "with_image_encoder" in inspect.signature(build).parameters:
            kwargs["with_image_encoder"] = False  # tracker actors never encode frames
        model = build(name=self.name, checkpoint=self.checkpoint, image_size=self.image_size, device=self.device,
                      **kwargs)
        return model.eval() if hasattr(model, "eval") else model


def limit_threads(num_threads: int | None) -> None:
    """Cap intra-op threads: many actors on few cores must not each spawn one thread per core."""
    if num_threads:
        os.environ["OMP_NUM_THREADS"] = str(num_threads)  # also covers a torch imported later
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(num_threads)


def in_actor_process() -> bool:
    """Whether this code runs inside a Ray worker (not in the driver, nor in-process)."""
    ray = sys.modules.get("ray")
    try:
        return ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - an older/newer Ray without these attributes
        return False


def tracker_class(model: Any) -> Any:
    """The class whose `from_state(model, state)` resumes a tracker."""
    cls = getattr(model, "tracker_class", None)
    if cls is not None:
        return cls
    from masklet.model import ObjectTracker  # the real model package

    return ObjectTracker


@dataclass(frozen=True)
class EmbeddingPayload:
    """A FrameEmbedding as numpy arrays: zero-copy through Ray's object store on CPU.

    Each array is stored in the tensor's own memory order (`orders` holds the permutation), so the
    tensor rebuilt on the other side has the encoder's exact strides. Hiera's features are
    channels-last in memory; making them NCHW-contiguous changes which convolution kernels the
    decoder runs and, through bf16 memories, the masks' last bits.
    """

    high_res_0: np.ndarray
    high_res_1: np.ndarray
    image_embed: np.ndarray
    orders: tuple[tuple[int, ...], ...] = ((0, 1, 2), (0, 1, 2), (0, 1, 2))

    @classmethod
    def from_embedding(cls, emb: FrameEmbedding) -> "EmbeddingPayload":
        arrays, orders = [], []
        for t in (emb.high_res_feats[0], emb.high_res_feats[1], emb.image_embed):
            order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))  # outermost dimension first
            arrays.append(t.detach().to("cpu").permute(order).contiguous().numpy())
            orders.append(order)
        return cls(*arrays, orders=tuple(orders))

    def to_embedding(self, device: str | torch.device = "cpu") -> FrameEmbedding:
        import torch

        from masklet.model.types import FrameEmbedding

        with warnings.catch_warnings():
            # Object-store arrays are read-only; the trackers never write into their inputs.
            warnings.simplefilter("ignore", UserWarning)
            tensors = []
            for array, order in zip((self.high_res_0, self.high_res_1, self.image_embed), self.orders):
                inverse = tuple(order.index(d) for d in range(len(order)))
                tensors.append(torch.from_numpy(array).permute(inverse))
        if str(device) != "cpu":
            tensors = [t.to(device, non_blocking=True) for t in tensors]
        return FrameEmbedding(high_res_feats=(tensors[0], tensors[1]), image_embed=tensors[2])

    @property
    def nbytes(self) -> int:
        return self.high_res_0.nbytes + self.high_res_1.nbytes + self.image_embed.nbytes


def as_embedding(value: Any, device: str = "cpu") -> FrameEmbedding:
    return value.to_embedding(device) if isinstance(value, EmbeddingPayload) else value


@dataclass(frozen=True)
class TrackedMask:
    """One object's result on one frame, as the publisher needs it."""

    object_id: int
    frame_idx: int
    mask: np.ndarray            # bool [H, W], video resolution
    score: float                # object-presence logit
    iou: float
    logits: np.ndarray | None = None  # float32 [H, W], only when soft mattes are asked for

    @property
    def present(self) -> bool:
        return self.score > 0


@dataclass(frozen=True)
class FrameMeta:
    stream_id: str
    frame_idx: int
    pts: float
    width: int
    height: int
    dropped_since_last: int = 0


@dataclass(frozen=True)
class StreamInfo:
    """What a stream's publisher needs to open its sinks."""

    stream_id: str
    width: int
    height: int
    fps: float
    object_ids: tuple[int, ...]
    model_name: str
    soft_masks: bool = False


class InputError(RuntimeError):
    """A source failed with an exception other than SourceError (a custom opener's ValueError, say);
    carries that exception's message flattened to one line, so the user still gets one clear line."""


def actor_pid() -> int:
    return os.getpid()
