"""The engine's configuration, its inputs (`StreamSpec`) and what it reports back (events, outcomes)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from masklet.actors.payloads import StreamInfo
from masklet.model.types import Prompt
from masklet.monitoring.stats import StatsSnapshot
from masklet.pipeline.batching import OverflowPolicy
from masklet.pipeline.executor_config import ExecutorConfig, require_bounds


@dataclass(frozen=True)
class EngineConfig:
    """The offline (file) scheduler's settings; `executor` holds what both schedulers share."""

    executor: ExecutorConfig = ExecutorConfig()
    # Per stream: frames in flight (WAIT) or queued for encoding, and at most `queue_bytes` of
    # decoded pixels held. A decoder read's frames are one object, freed with its last frame, so the
    # budget counts a read's tail too (file_stream.frames_within; 720p: 32 frames in flight, 1080p:
    # 11, 4K: 3). Deep enough that a round carries 8-16 frames a stage call: Ray's per-call work is
    # paid per round. Side by side in the ceiling benchmark (bench/results/objects_bench.json,
    # "small_rounds"), the null-model pipeline took 20.8 against 23.7 ms of CPU per frame with 16 and
    # 4 (the old defaults) in one run, 23.5 against 23.0 in the next: the gain is within this VM's
    # noise there. Archives ran 1.05x -> 1.29x a plain loop.
    queue_capacity: int = 32
    queue_bytes: int = 128 << 20
    replay_frames: int = 64           # per stream: frames kept for tracker replay
    snapshot_every: int = 30          # tracker snapshot interval, in steps (<= replay_frames)
    backward_delay: int = 0           # see FileStream; the real model needs max_obj_ptrs - 1
    decode_chunk: int = 16            # frames per decoder call: fewer round trips, same order
    soft_masks: bool = False          # 8-bit alpha mattes (the publisher upsamples the logits)
    max_active_streams: int = 8       # inputs open at once; an archive of thousands opens them in turn

    def __post_init__(self) -> None:
        require_bounds(self, at_least_one=("queue_capacity", "queue_bytes", "replay_frames", "snapshot_every",
                                           "decode_chunk", "max_active_streams"),
                       non_negative=("backward_delay",))
        if self.snapshot_every > self.replay_frames:
            raise ValueError(f"EngineConfig.snapshot_every ({self.snapshot_every}) must not exceed replay_frames "
                             f"({self.replay_frames}): replay starts at the last snapshot")


@dataclass(frozen=True)
class StreamSpec:
    stream_id: str
    opener: Callable[[], Any]                       # -> FrameSource (pipeline.sources interface)
    objects: Mapping[int, Mapping[int, Prompt]]     # object id -> {frame_idx: prompt}
    sink_factory: Callable[[StreamInfo], list]      # runs inside the publisher actor; a `needs_pixels = False`
                                                    # attribute keeps frame pixels from being sent to it
    bidirectional: bool = True
    policy: OverflowPolicy = OverflowPolicy.WAIT
    source_type: str = "file"


@dataclass(frozen=True)
class EngineEvent:
    kind: str            # stream_failed | sink_error | encoder_restarted | tracker_restarted | stream_done
    stream_id: str | None
    message: str


@dataclass
class StreamOutcome:
    stream_id: str
    frames_published: int = 0
    frames_total: int | None = None
    width: int = 0
    height: int = 0
    fps: float | None = None
    objects: int = 0
    error: str | None = None
    sink_errors: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.sink_errors


@dataclass
class RunReport:
    streams: dict[str, StreamOutcome]
    events: list[EngineEvent]
    batch_sizes: Counter
    stats: StatsSnapshot
    encoder_restarts: int = 0
    tracker_restarts: int = 0
    tracker_batch_sizes: Counter = field(default_factory=Counter)  # objects per batched tracker step
    actors: dict = field(default_factory=dict)                     # actor name -> report (node, pid, ...)
