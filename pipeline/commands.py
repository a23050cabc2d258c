"""What a scheduler asks of the executor, and what comes back: plain frozen values.

Both schedulers (files: `pipeline.files`, live streams: `pipeline.live_state`) decide; the one
`Executor` does. A scheduler round returns a list of commands; the executor places them on actors
(batching encoder frames across streams and tracker steps across objects) and hands back
completions. Neither side sees the other's internals, and `Any` values here are references
(Ray object refs, or plain values in-process) that the scheduler only passes on.

Every command that produces something carries a `tag` the scheduler chooses; the completion
returns it untouched (a generation, a sequence number: whatever the scheduler needs to tell
fresh results from stale ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from masklet.actors.payloads import EncodedImage, FrameMeta, StreamInfo
from masklet.actors.tracker import FORWARD, ObjectKey
from masklet.model.types import Prompt

# -- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenSource:
    stream_id: str
    opener: Callable[[], Any]       # -> FrameSource (actors.sources interface), runs in a decoder actor


@dataclass(frozen=True)
class ReadFrames:
    stream_id: str
    max_frames: int


@dataclass(frozen=True)
class CloseSource:
    stream_id: str


@dataclass(frozen=True)
class DecodeImage:
    """A compressed live frame -> pixels, in a decoder actor (never in the driver)."""

    stream_id: str
    frame_idx: int
    image: EncodedImage


# -- encoder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encode:
    stream_id: str
    frame_idx: int
    rgb: Any                        # reference to uint8 [H, W, 3] pixels (or a FrameFailure)


# -- objects ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenObject:
    """Place an object on a tracker actor: fresh, or resumed from a snapshot reference."""

    key: ObjectKey
    video_size: tuple[int, int]
    num_frames: Optional[int] = None
    snapshot: Any = None


@dataclass(frozen=True)
class Step:
    key: ObjectKey
    frame_idx: int
    embedding: Any
    prompt: Optional[Prompt] = None
    direction: str = FORWARD
    tag: Any = None


@dataclass(frozen=True)
class Refine:
    """Correct the object's latest forward frame with clicks (the model's `refine`)."""

    key: ObjectKey
    frame_idx: int
    embedding: Any
    prompt: Prompt
    tag: Any = None


@dataclass(frozen=True)
class BranchBackward:
    key: ObjectKey


@dataclass(frozen=True)
class Snapshot:
    key: ObjectKey
    tag: Any = None


@dataclass(frozen=True)
class CloseObject:
    key: ObjectKey


# -- publishing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenPublisher:
    info: StreamInfo
    sink_factory: Optional[Callable[[StreamInfo], list]] = None   # runs inside the publisher actor


@dataclass(frozen=True)
class Publish:
    meta: FrameMeta
    rgb: Any                                 # reference to the frame's pixels, or None
    results: tuple[Any, ...]                 # references to ObjectResults, any order
    tag: Any = None


@dataclass(frozen=True)
class ClosePublisher:
    stream_id: str


Command = Union[OpenSource, ReadFrames, CloseSource, DecodeImage, Encode, OpenObject, Step, Refine,
                BranchBackward, Snapshot, CloseObject, OpenPublisher, Publish, ClosePublisher]


# -- completions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceOpened:
    stream_id: str
    info: Any                                # actors.decoder.SourceInfo


@dataclass(frozen=True)
class FrameRef:
    frame_idx: int
    pts: float
    rgb: Any                                 # the pixels: PackedResult(read pack, i)


@dataclass(frozen=True)
class FramesRead:
    stream_id: str
    frames: tuple[FrameRef, ...]             # empty: the input has ended


@dataclass(frozen=True)
class FrameDecoded:
    stream_id: str
    frame_idx: int
    rgb: Any


@dataclass(frozen=True, eq=False)
class DeferredEmbedding:
    """A colocated shard's embedding before it exists: the frame it will be computed from, there."""

    stream_id: str
    frame_idx: int
    rgb: Any


@dataclass(frozen=True)
class Encoded:
    stream_id: str
    frame_idx: int
    embedding: Any


@dataclass(frozen=True)
class FrameFailed:
    """A frame has no pixels or no embedding (undecodable, or the encoder kept dying)."""

    stream_id: str
    frame_idx: int
    reason: str


@dataclass(frozen=True)
class StepDone:
    key: ObjectKey
    frame_idx: int
    result: Any                              # reference to an ObjectResult
    score: float                             # its presence logit (read from the tiny status)
    tag: Any = None


@dataclass(frozen=True)
class SnapshotTaken:
    key: ObjectKey
    snapshot: Any                            # reference to an ObjectSnapshot
    tag: Any = None


@dataclass(frozen=True)
class ObjectFailed:
    """An operation of the object raised (a bad prompt, say): the object cannot go on as it was."""

    key: ObjectKey
    reason: str
    tag: Any = None


@dataclass(frozen=True)
class ObjectLost:
    """The object's tracker actor died: reopen it from its last snapshot and replay (or give up)."""

    key: ObjectKey
    reason: str


@dataclass(frozen=True)
class PublisherOpened:
    stream_id: str
    errors: tuple[str, ...]


@dataclass(frozen=True)
class Published:
    stream_id: str
    frame_idx: int
    ack: Any                                 # actors.publisher.PublishAck
    tag: Any = None


@dataclass(frozen=True)
class PublisherClosed:
    stream_id: str
    errors: tuple[str, ...]


@dataclass(frozen=True)
class StreamFailed:
    """The stream cannot go on (its source failed, its decoder or publisher died)."""

    stream_id: str
    reason: str


Completion = Union[SourceOpened, FramesRead, FrameDecoded, Encoded, FrameFailed, StepDone, SnapshotTaken,
                   ObjectFailed, ObjectLost, PublisherOpened, Published, PublisherClosed, StreamFailed]


@dataclass(frozen=True)
class ExecutorEvent:
    """Something a user should hear about (restarts, recoveries), in one line."""

    kind: str            # encoder_restarted | tracker_restarted | object_recovered | ...
    stream_id: Optional[str]
    message: str
