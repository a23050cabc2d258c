"""Values the stages exchange, and how a model is rebuilt inside an actor process.

Everything that crosses an actor boundary is a small frozen dataclass of numpy arrays and scalars
(never a module). Ray moves numpy arrays through its shared-memory object store without copying
them per reader, so an embedding put once is read by every tracker of its stream from the same
memory, and a tracker result is a low-resolution logit map of a few KB, not a video-size mask.

torch is imported lazily: decoder and publisher processes never touch a tensor, and importing torch
costs each of them about 1.5 CPU-seconds at start-up (on a 2-core machine, time the encoder loses).
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from masklet.actors.runtime import actor_pid, in_actor_process, limit_threads  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch

    from masklet.model.types import FrameEmbedding

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ModelSpec:
    """How to build the model in any process; random weights are seeded so every copy agrees.

    `factory` is the plug-in seam: "module:function" with the signature
    `build(name, checkpoint, image_size, device, **kwargs)` returning an object that follows
    `masklet.model.protocols.SegmentationModel` (see that module for the contract).
    """

    name: str = "sam2.1_hiera_tiny"
    checkpoint: str | None = None  # None: random weights; otherwise a local file path
    image_size: int = 1024
    device: str = "cpu"
    factory: str = "masklet.model:build_model"  # "module:function"; tests point this at a fake
    seed: int = 0
    precision: str = "fp32"  # fp32 (exact) | bf16 (autocast, as the official predictor runs on GPUs)

    def __post_init__(self) -> None:
        if ":" not in self.factory:
            raise ValueError(f"model factory must be 'module:function', got {self.factory!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def factory_function(self) -> Any:
        """The factory itself; ValueError (one line) when it cannot be imported."""
        module_name, func_name = self.factory.split(":", 1)
        try:
            build = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load model factory {self.factory}: {exc}") from None
        if not callable(build):
            raise ValueError(f"model factory {self.factory} is not callable")
        return build

    def build(self, with_image_encoder: bool = True) -> Any:
        build = self.factory_function()
        import torch

        torch.manual_seed(self.seed)
        params = inspect.signature(build).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs: dict[str, Any] = {}
        if not with_image_encoder and ("with_image_encoder" in params or takes_any):
            kwargs["with_image_encoder"] = False  # tracker actors never encode frames
        if self.precision != "fp32":
            if "precision" not in params and not takes_any:
                raise ValueError(f"model factory {self.factory} takes no precision; it supports fp32 only")
            kwargs["precision"] = self.precision
        model = build(name=self.name, checkpoint=self.checkpoint, image_size=self.image_size, device=self.device,
                      **kwargs)
        return model.eval() if hasattr(model, "eval") else model


# -- frames ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImage:
    """A compressed frame (JPEG/PNG) as it came off the wire; a decoder actor turns it into pixels.
    width/height are read from the image header by whoever received it (no pixel decode there)."""

    data: bytes = field(repr=False)
    content_type: str
    width: int
    height: int


@dataclass(frozen=True)
class StoredFrame:
    """Pixels already in the backend's store: a future or reference (`Backend.call`/`put`) of a uint8
    [height, width, 3] array, e.g. what a source reader actor returned. Whoever passes it on never
    fetches the pixels; stages read them from the store."""

    pixels: Any = field(repr=False)
    height: int
    width: int


@dataclass(frozen=True)
class FrameFailure:
    """Stands in for a frame that could not be decoded; stages pass it through untouched."""

    reason: str


# -- embeddings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingPayload:
    """A FrameEmbedding as numpy arrays: zero-copy through Ray's object store on CPU.

    Each array is stored in the tensor's own memory order (`orders` holds the permutation), so the
    tensor rebuilt on the other side has the encoder's exact strides. Hiera's features are
    channels-last in memory; making them NCHW-contiguous changes which convolution kernels the
    decoder runs and, through bf16 memories, the masks' last bits. bf16 tensors (numpy has no
    bf16) travel as their raw 16-bit patterns (`bf16` True) and are rebuilt bit for bit.
    """

    high_res_0: np.ndarray
    high_res_1: np.ndarray
    image_embed: np.ndarray
    orders: tuple[tuple[int, ...], ...] = ((0, 1, 2), (0, 1, 2), (0, 1, 2))
    bf16: bool = False

    @classmethod
    def from_embedding(cls, emb: FrameEmbedding) -> "EmbeddingPayload":
        import torch

        tensors = (emb.high_res_feats[0], emb.high_res_feats[1], emb.image_embed)
        bf16 = any(t.dtype == torch.bfloat16 for t in tensors)
        arrays, orders = [], []
        for t in tensors:
            order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))  # outermost dimension first
            t = t.detach().to("cpu").permute(order).contiguous()
            if bf16:
                t = t.to(torch.bfloat16).view(torch.int16)
            arrays.append(t.numpy())
            orders.append(order)
        return cls(*arrays, orders=tuple(orders), bf16=bf16)

    def to_embedding(self, device: str | torch.device = "cpu") -> FrameEmbedding:
        import torch

        from masklet.model.types import FrameEmbedding

        with warnings.catch_warnings():
            # Object-store arrays are read-only; the trackers never write into their inputs.
            warnings.simplefilter("ignore", UserWarning)
            tensors = []
            for array, order in zip((self.high_res_0, self.high_res_1, self.image_embed), self.orders):
                inverse = tuple(order.index(d) for d in range(len(order)))
                t = torch.from_numpy(array)
                if self.bf16:
                    t = t.view(torch.bfloat16)
                tensors.append(t.permute(inverse))
        if str(device) != "cpu":
            tensors = [t.to(device, non_blocking=True) for t in tensors]
        return FrameEmbedding(high_res_feats=(tensors[0], tensors[1]), image_embed=tensors[2])

    @property
    def nbytes(self) -> int:
        return self.high_res_0.nbytes + self.high_res_1.nbytes + self.image_embed.nbytes


def as_embedding(value: Any, device: str = "cpu") -> FrameEmbedding:
    return value.to_embedding(device) if isinstance(value, EmbeddingPayload) else value


# -- tracker results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectResult:
    """One object's result on one frame, as the publisher needs it: small.

    `low_res_logits` are the mask decoder's logits at S/4 x S/4 (the official predictor's
    `pred_masks`); the publisher upsamples them to `video_size` (bilinear, align_corners=False)
    and thresholds at 0, which is exactly how the official predictor makes `video_res_masks`.
    """

    object_id: int
    frame_idx: int
    low_res_logits: np.ndarray   # float32 [S/4, S/4]
    score: float                 # object-presence logit (> 0: present)
    iou: float                   # the mask decoder's IoU estimate
    video_size: tuple[int, int]  # (H, W) of the stream

    @property
    def present(self) -> bool:
        return self.score > 0


class ResultPack:
    """A tracker call's results as ONE pickled value: ids, frame numbers, scores and IoUs as plain
    tuples, the logits stacked when they share a shape. Ray pickles every dataclass of a tuple on
    its own (cloudpickle's per-object hook) and every reader unpickles them again: 64 results took
    0.45 ms to pickle as ObjectResults, 0.05 ms packed. Indexing gives `ObjectResult`s back, their
    logits views of the stacked array."""

    __slots__ = ("object_ids", "frame_idxs", "logits", "scores", "ious", "video_sizes")

    def __init__(self, object_ids: tuple, frame_idxs: tuple, logits: Any, scores: tuple, ious: tuple,
                 video_sizes: tuple) -> None:
        self.object_ids, self.frame_idxs, self.logits = object_ids, frame_idxs, logits
        self.scores, self.ious, self.video_sizes = scores, ious, video_sizes

    @classmethod
    def of(cls, results: Any) -> "ResultPack":
        results = tuple(results)
        arrays = [np.asarray(r.low_res_logits) for r in results]
        same = len({(a.shape, a.dtype) for a in arrays}) == 1
        return cls(tuple(int(r.object_id) for r in results), tuple(int(r.frame_idx) for r in results),
                   np.stack(arrays) if same else tuple(arrays), tuple(float(r.score) for r in results),
                   tuple(float(r.iou) for r in results), tuple(tuple(r.video_size) for r in results))

    def __len__(self) -> int:
        return len(self.object_ids)

    def __getitem__(self, i: int) -> ObjectResult:
        return ObjectResult(self.object_ids[i], self.frame_idxs[i], self.logits[i], self.scores[i], self.ious[i],
                            self.video_sizes[i])

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))

    def __reduce__(self) -> tuple:
        return ResultPack, (self.object_ids, self.frame_idxs, self.logits, self.scores, self.ious, self.video_sizes)


@dataclass(frozen=True)
class PackedResult:
    """One value inside a call's packed tuple of values: a tracker call's results
    (`actors.tracker.return_layout`) or a decoder read's frames. `ref` is that call's (future)
    tuple, `index` this value's place in it. One Ray object per call instead of one per value: each
    object costs the raylet, its owner and its reader work of their own (measured: 16 frames of a
    read as 16 objects took 3.4-3.7 ms of CPU per frame, as one tuple 1.6-2.9)."""

    ref: Any
    index: int


Pick = tuple[int, Optional[int]]   # (argument slot, index inside a packed tuple or None)


class ArgLayout:
    """A call's top-level arguments, each distinct value once: a packed tuple (shared by all of its
    values), a lone value. Ray resolves references only at the top level, so a packed value travels
    as its tuple's slot plus its index (a `Pick`), and the callee picks it with `picked`."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self._slot: dict[int, int] = {}

    def slot(self, value: Any) -> int:
        key = id(value)
        if key not in self._slot:
            self._slot[key] = len(self.values)
            self.values.append(value)
        return self._slot[key]

    def pick(self, value: Any) -> Pick:
        if isinstance(value, PackedResult):
            return self.slot(value.ref), value.index
        return self.slot(value), None

    def picks(self, values: Any) -> tuple[Pick, ...]:
        return tuple(self.pick(v) for v in values)


def picked(pick: Pick, values: Any) -> Any:
    """The value a `Pick` names among a call's resolved arguments."""
    slot, index = pick
    return values[slot] if index is None else values[slot][index]


@dataclass(frozen=True)
class FrameMeta:
    stream_id: str
    frame_idx: int
    pts: float
    width: int
    height: int
    dropped_since_last: int = 0
    lost_since_last: int = 0
    revision: int = 0
    republished: bool = False   # a revision (or a restart's re-publication) of a frame already out


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
    return_records: bool = False  # live streams: the record comes back to the caller (Kafka, API)
    mask_kernel: str = ""         # actors.masks.mask_kernel for this stream's sizes ("": calibrate there)


class InputError(RuntimeError):
    """A source failed with an exception other than SourceError (a custom opener's ValueError, say);
    carries that exception's message flattened to one line, so the user still gets one clear line."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def restore_tracker(model: Any, state: dict) -> Any:
    """Resume a tracker from `state_dict()` with the model's own `restore_tracker` (protocol), or,
    for plug-in models that predate it, with their tracker class's `from_state`."""
    restore: Optional[Any] = getattr(model, "restore_tracker", None)
    if restore is not None:
        return restore(state)
    cls = getattr(model, "tracker_class", None)
    if cls is None:
        from masklet.model import ObjectTracker

        cls = ObjectTracker
    return cls.from_state(model, state)
