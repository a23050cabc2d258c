"""How the execution core runs: batching, placement capacities, threads, devices, restart budgets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from masklet.actors.sources import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from masklet.actors.payloads import ModelSpec


def require_bounds(config: object, *, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """For frozen config dataclasses: a ValueError naming `Class.field` for a count below one or a
    negative amount."""
    owner = type(config).__name__
    for name in at_least_one:
        if getattr(config, name) < 1:
            raise ValueError(f"{owner}.{name} must be at least 1, got {getattr(config, name)}")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ValueError(f"{owner}.{name} must not be negative, got {getattr(config, name)}")


@dataclass(frozen=True)
class ExecutorConfig:
    # The same defaults as settings.pipeline (one source for every command: configure.py maps them).
    max_batch_size: int = 8            # frames per encoder forward pass, from any streams
    max_wait_ms: float = 10.0          # how long a partial batch may wait for more frames
    encoder_queue_depth: int = 2       # batches submitted ahead, so the encoder never idles
    objects_per_tracker: int = 16      # objects packed onto one tracker actor (1: one actor per object)
    max_step_batch: int = 8            # objects per batched tracker step (bounds a pass's activation memory)
    streams_per_decoder: int = 4       # streams sharing one decoder actor
    streams_per_publisher: int = 4     # streams sharing one publisher actor
    publishers_before_sharing: int = 2  # streams get a publisher of their own until this many exist
    encoder_threads: Optional[int] = None  # None: every core the encoder process may use
    tracker_threads: Optional[int] = 1     # several tracker actors share few cores: one thread each
    encoder_gpus: float = 0.0          # Ray GPU share of the encoder (fractions share one GPU)
    tracker_gpus: float = 0.0          # Ray GPU share of each tracker actor
    max_encoder_restarts: int = 3      # per run; beyond it the frames in flight fail
    max_tracker_restarts: int = 8      # per run, all tracker actors together
    spread: bool = True                # spread tracker actors over the cluster's nodes (Ray SPREAD)
    # Custom Ray resources per role, e.g. (("masklet_gpu", 1),) to keep encoders on GPU nodes.
    encoder_resources: tuple[tuple[str, float], ...] = ()
    tracker_resources: tuple[tuple[str, float], ...] = ()
    io_resources: tuple[tuple[str, float], ...] = ()   # decoders and publishers
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Encoder and trackers in one process (actors.shard): embeddings never leave the device. The
    # default for CUDA (configure.py); on CPU it trades the encoder's own cores for fewer copies.
    colocate: bool = False
    shard_cache_frames: int = 64       # embeddings a shard keeps (re-encoded from pixels if needed again)

    def __post_init__(self) -> None:
        require_bounds(self, at_least_one=("max_batch_size", "encoder_queue_depth", "objects_per_tracker",
                                           "max_step_batch", "streams_per_decoder", "streams_per_publisher",
                                           "publishers_before_sharing", "max_pixels", "shard_cache_frames"),
                       non_negative=("max_wait_ms", "encoder_gpus", "tracker_gpus", "max_encoder_restarts",
                                     "max_tracker_restarts"))


# Factories whose trackers return S/4 x S/4 low-resolution logits (SAM 2's mask decoder).
QUARTER_RES_FACTORIES = ("masklet.model:build_model", "masklet.model.null_model:build_null_model")


def publisher_mask_kernel(model: "ModelSpec", height: int, width: int) -> str:
    """How the stream's publisher reproduces the upsampling (actors.masks.mask_kernel), decided here,
    in the scheduler's process, so publishers never need torch for it; "" lets the publisher decide
    (a plug-in model's low-resolution size is not known here)."""
    if model.factory not in QUARTER_RES_FACTORIES:
        return ""
    from masklet.actors.masks import mask_kernel

    side = model.image_size // 4
    return mask_kernel((side, side), (height, width))
