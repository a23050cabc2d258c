"""The live session's settings and what it hands out (outputs, status, refusals)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import numpy as np

from masklet.actors.messages import MaskletRecord
from masklet.actors.prompt_limits import InputLimits
from masklet.actors.rle import decode_rle
from masklet.pipeline.executor_config import ExecutorConfig, require_bounds


@dataclass(frozen=True)
class LiveConfig:
    executor: ExecutorConfig = ExecutorConfig()
    queue_capacity: int = 8              # per stream, DROP_OLDEST: every drop counted and reported
    ring_buffer_frames: int = 32         # recent frames kept per stream for late prompts and revisions
    snapshot_every: int = 30
    soft_masks: bool = False
    max_streams: int = 16
    limits: InputLimits = InputLimits()  # per-prompt and object caps (settings.limits)
    max_in_flight: int = 4               # per stream: frames taken from the queue, not yet published
    revisions: bool = True               # republish frames a late prompt changed (revision + 1)

    def __post_init__(self) -> None:
        require_bounds(self, at_least_one=("queue_capacity", "ring_buffer_frames", "snapshot_every", "max_streams",
                                           "max_in_flight"))
        if self.snapshot_every > self.ring_buffer_frames:
            raise ValueError(f"snapshot_every ({self.snapshot_every}) must not exceed ring_buffer_frames "
                             f"({self.ring_buffer_frames}), or a restarted tracker cannot replay to its snapshot")


@dataclass(frozen=True)
class LiveOutput:
    """One published record (first publication or a revision) of one stream's frame.

    `record` is None only for a frame that could not be decoded; `failure` then says why (Kafka
    dead-letters it). Pixels stay out of the driver: `rgb` fetches the frame on demand (overlays),
    and `masks` decodes the record's RLE on demand.
    """

    record: Optional[MaskletRecord]
    tokens: tuple                        # submit tokens settled: dropped/late frames since the last output, then its own
    failure: Optional[str] = None
    fetch_rgb: Optional[Callable[[], Optional[np.ndarray]]] = field(default=None, repr=False, compare=False)

    @property
    def revision(self) -> int:
        return 0 if self.record is None else self.record.revision

    @functools.cached_property
    def masks(self) -> dict[int, np.ndarray]:
        """object_id -> bool [H, W], decoded from the record's RLE (what consumers see)."""
        if self.record is None:
            return {}
        return {o.object_id: decode_rle({"size": list(o.rle.size), "counts": o.rle.counts}) for o in self.record.objects}

    @functools.cached_property
    def rgb(self) -> Optional[np.ndarray]:
        """The frame (H, W, 3) uint8, for previews and overlays; None when it is not kept."""
        return None if self.fetch_rgb is None else self.fetch_rgb()


@dataclass(frozen=True)
class StreamStatus:
    stream_id: str
    width: int
    height: int
    frames_in: int
    frames_published: int
    frames_dropped: int
    fps: float                           # published frames per second over the last few seconds
    lag_frames: int                      # submitted, not yet published (queued + in flight)
    objects: dict[int, float]            # object_id -> last presence score
    frames_lost: int = 0                 # frames reported missing by the source (gaps in frame_idx)
    revisions: int = 0                   # records republished because a late prompt changed them


class PromptRejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


Token = Any


@runtime_checkable
class LiveSessionAPI(Protocol):
    """What callers (masklet run, the control API, feeders) use of a live session; `LiveSession`
    implements it, and test doubles are checked against it (tests/pipeline/test_fakes_follow_protocols.py)."""

    config: LiveConfig
    on_output: Optional[Callable[[LiveOutput], None]]

    def open_stream(self, stream_id: str, width: int, height: int, fps: float | None = None, *,
                    source_type: str = "live", published_until: Optional[int] = None,
                    revision_floor: int = 0) -> None: ...

    def close_stream(self, stream_id: str, timeout: float = 60.0) -> None: ...

    def streams(self) -> list[str]: ...

    def submit_frame(self, stream_id: str, frame_idx: int, pts: float, image: Any, token: Any = None, *,
                     lost_before: int = 0) -> None: ...

    def queue_room(self, stream_id: str) -> int: ...

    def submit_prompt(self, msg: Any) -> None: ...

    def status(self, stream_id: str) -> StreamStatus: ...

    def latest(self, stream_id: str) -> Optional[LiveOutput]: ...

    def stats_snapshot(self) -> Any: ...

    def poll(self, timeout: float = 0.0) -> list[LiveOutput]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def shutdown(self) -> None: ...
