"""The input gate of `masklet run`: every consumed frame or prompt passes here first.

A record either comes out validated (a frame checked from its headers and image header, still
encoded; a parsed prompt) or goes to the
dead-letter topic with a reason, is counted, and the caller moves on to the next record; one
bad message never stops a stream. Every decode and check runs behind one guard (`_guarded`): a
failure nobody foresaw (a decoder bug, RecursionError, MemoryError) is still a dead letter with
reason "internal_error", never an exception that kills the run and replays the record forever.

The gate also learns each stream's frame size, which is what makes "out of range" decidable for
prompts, and its newest frame index: a frame more than `limits.max_frame_gap` past it is a dead
letter (one header of 99999999999999999999999 used to make every later frame "out of order").
A producer that really jumped ahead gets through after `limits.frame_gap_resync` frames in a row
agree on the new position. A prompt for a stream with no frame yet passes with its structure
checked; the runner holds it and `recheck`s it once the stream's first frame is here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from masklet.actors.messages import PromptMessage
from masklet.actors.payloads import EncodedImage
from masklet.actors.prompt_limits import InputLimits
from masklet.pipeline.kafka.codec import check_prompt_range, inspect_frame, parse_prompt
from masklet.pipeline.kafka.deadletter import DeadLetterPublisher, Rejected

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class AcceptedFrame:
    stream_id: str
    frame_idx: int
    pts: float
    image: EncodedImage = field(repr=False)  # decoded by a decoder actor, never in the driver
    topic: str
    partition: int
    offset: int

    @property
    def size(self) -> tuple[int, int]:
        return self.image.width, self.image.height


@dataclass
class _FrameWindow:
    """Per stream: the newest accepted frame index, and a run of frames beyond the window."""

    newest: int
    jump_last: Optional[int] = None
    jump_count: int = 0


class InputGate:
    def __init__(self, deadletters: DeadLetterPublisher, max_pixels: int, stats: Any = None,
                 limits: InputLimits = InputLimits()) -> None:
        self.deadletters = deadletters
        self.max_pixels = max_pixels
        self.stats = stats
        self.limits = limits
        self.stream_sizes: dict[str, tuple[int, int]] = {}
        self._windows: dict[str, _FrameWindow] = {}

    def frame(self, record: Any) -> Optional[AcceptedFrame]:
        """A kafka-python ConsumerRecord from the frames topic -> AcceptedFrame, or None if dead-lettered."""
        accepted = self._guarded(record, "frame", lambda: self._accept_frame(record))
        if accepted is None:
            return None
        self.stream_sizes[accepted.stream_id] = accepted.size
        return accepted

    def prompt(self, record: Any) -> Optional[PromptMessage]:
        """A ConsumerRecord from the prompts topic -> PromptMessage, or None if dead-lettered."""
        return self._guarded(record, "prompt",
                             lambda: parse_prompt(record.value, self.stream_sizes, self.limits))

    def recheck(self, prompt: PromptMessage, record: Any) -> bool:
        """A prompt that passed before its stream was known: inside the frame now? Else dead-lettered."""
        return self._guarded(record, "prompt",
                             lambda: check_prompt_range(prompt, self.stream_sizes, self.limits) or True) is not None

    def _accept_frame(self, record: Any) -> AcceptedFrame:
        stream_id, meta, image = inspect_frame(record.key, record.value, record.headers, self.max_pixels)
        self._check_window(stream_id, meta.frame_idx)
        return AcceptedFrame(stream_id, meta.frame_idx, meta.pts, image, record.topic, record.partition, record.offset)

    def _check_window(self, stream_id: str, frame_idx: int) -> None:
        window = self._windows.get(stream_id)
        if window is None:  # a stream's first frame on this member may start anywhere
            self._windows[stream_id] = _FrameWindow(frame_idx)
            return
        gap = self.limits.max_frame_gap
        if frame_idx - window.newest <= gap:
            window.newest = max(window.newest, frame_idx)
            window.jump_last, window.jump_count = None, 0
            return
        follows = window.jump_last is not None and 0 < frame_idx - window.jump_last <= gap
        window.jump_count = window.jump_count + 1 if follows else 1
        window.jump_last = frame_idx
        if window.jump_count >= self.limits.frame_gap_resync:
            log.warning("stream %s: frame_idx jumped from %d to %d; %d frames in a row agree, following it",
                        stream_id, window.newest, frame_idx, window.jump_count)
            window.newest, window.jump_last, window.jump_count = frame_idx, None, 0
            return
        raise Rejected("bad_frame_headers", "frame_idx_out_of_window",
                       f"frame_idx {frame_idx} is {frame_idx - window.newest} past the stream's newest frame "
                       f"{window.newest} (limits.max_frame_gap {gap})")

    def _guarded(self, record: Any, what: str, check: Callable[[], T]) -> Optional[T]:
        """The one guard around every decode and validation: the value, or None after a dead letter.

        `what` is "frame" or "prompt"; refused frames are also counted as dropped frames.
        """
        try:
            return check()
        except Rejected as rejected:
            refused = rejected
        except Exception as exc:  # noqa: BLE001 - no record may kill the run (RecursionError, MemoryError, bugs)
            log.exception("unexpected %s while checking a %s at %s[%s]@%s", type(exc).__name__, what,
                          getattr(record, "topic", "?"), getattr(record, "partition", "?"),
                          getattr(record, "offset", "?"))
            first_line = (str(exc).splitlines() or [""])[0][:200]
            refused = Rejected("internal_error", f"unexpected_{what}_error", f"{type(exc).__name__}: {first_line}")
        self.deadletters.publish(refused, source_topic=record.topic, payload=record.value, key=record.key,
                                 headers=record.headers, partition=record.partition, offset=record.offset)
        if what == "frame" and self.stats is not None:
            self.stats.inc("masklet_frames_dropped_total", reason=refused.reason)
        return None
