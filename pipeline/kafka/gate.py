"""The input gate of `masklet run`: every consumed frame or prompt passes here first.

A record either comes out validated (decoded RGB frame, parsed prompt) or goes to the
dead-letter topic with a reason, is counted, and the caller moves on to the next record; one
bad message never stops a stream. The gate also learns each stream's frame size, which is what
makes "out of range" decidable for prompts. A prompt for a stream with no frame yet passes with
its structure checked; the runner holds it and `recheck`s it once the stream's first frame is here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from masklet.pipeline.kafka.codec import check_prompt_range, decode_frame, parse_prompt
from masklet.pipeline.kafka.deadletter import DeadLetterPublisher, Rejected
from masklet.actors.messages import PromptMessage


@dataclass(frozen=True)
class AcceptedFrame:
    stream_id: str
    frame_idx: int
    pts: float
    rgb: np.ndarray = field(repr=False)
    topic: str
    partition: int
    offset: int

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


class InputGate:
    def __init__(self, deadletters: DeadLetterPublisher, max_pixels: int, stats: Any = None) -> None:
        self.deadletters = deadletters
        self.max_pixels = max_pixels
        self.stats = stats
        self.stream_sizes: dict[str, tuple[int, int]] = {}

    def frame(self, record: Any) -> Optional[AcceptedFrame]:
        """A kafka-python ConsumerRecord from the frames topic -> AcceptedFrame, or None if dead-lettered."""
        try:
            stream_id, meta, rgb = decode_frame(record.key, record.value, record.headers, self.max_pixels)
        except Rejected as rejected:
            self._dead_letter(rejected, record)
            if self.stats is not None:
                self.stats.inc("masklet_frames_dropped_total", reason=rejected.reason)
            return None
        self.stream_sizes[stream_id] = (rgb.shape[1], rgb.shape[0])
        return AcceptedFrame(stream_id, meta.frame_idx, meta.pts, rgb, record.topic, record.partition, record.offset)

    def prompt(self, record: Any) -> Optional[PromptMessage]:
        """A ConsumerRecord from the prompts topic -> PromptMessage, or None if dead-lettered."""
        try:
            return parse_prompt(record.value, self.stream_sizes)
        except Rejected as rejected:
            self._dead_letter(rejected, record)
            return None

    def recheck(self, prompt: PromptMessage, record: Any) -> bool:
        """A prompt that passed before its stream was known: inside the frame now? Else dead-lettered."""
        try:
            check_prompt_range(prompt, self.stream_sizes)
        except Rejected as rejected:
            self._dead_letter(rejected, record)
            return False
        return True

    def _dead_letter(self, rejected: Rejected, record: Any) -> None:
        self.deadletters.publish(rejected, source_topic=record.topic, payload=record.value, key=record.key,
                                 headers=record.headers, partition=record.partition, offset=record.offset)
