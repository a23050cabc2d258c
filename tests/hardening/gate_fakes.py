"""Consumer records and a producer stand-in for driving the Kafka InputGate without a broker."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from masklet.actors.messages import DeadLetter
from masklet.pipeline.kafka.codec import encode_jpeg, frame_headers
from masklet.pipeline.kafka.deadletter import DeadLetterPublisher
from masklet.pipeline.kafka.gate import InputGate

W, H = 64, 48


@dataclass
class Record:
    """The fields of kafka-python's ConsumerRecord that the gate reads."""

    topic: str
    value: Optional[bytes]
    key: Optional[bytes] = b"cam"
    headers: list = field(default_factory=list)
    partition: int = 0
    offset: int = 0


class CapturingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Optional[bytes], list]] = []

    def send(self, topic, value=None, key=None, headers=None):
        self.sent.append((topic, value, key, headers or []))

    def letters(self) -> list[DeadLetter]:
        return [DeadLetter.from_json_bytes(value) for _, value, _, _ in self.sent]


def make_gate(**kwargs) -> tuple[InputGate, CapturingProducer]:
    producer = CapturingProducer()
    return InputGate(DeadLetterPublisher(producer, "dl"), max_pixels=1920 * 1080, **kwargs), producer


_offsets = iter(range(10**9))


def frame_record(frame_idx, stream: bytes = b"cam", seed: int = 0) -> Record:
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    headers = [(k, v) for k, v in frame_headers(0, 0.1, W, H)]
    headers = [(k, str(frame_idx).encode() if k == "frame_idx" else v) for k, v in headers]
    return Record("frames", encode_jpeg(rgb), key=stream, headers=headers, offset=next(_offsets))


def prompt_record(value: bytes | dict, stream: bytes = b"cam") -> Record:
    if isinstance(value, dict):
        value = json.dumps(value).encode()
    return Record("prompts", value, key=stream, offset=next(_offsets))


def prompt_body(**fields) -> dict:
    body = {"schema": "prompt/v1", "stream_id": "cam", "object_id": 1, "frame_idx": 0, "action": "add",
            "points": [[10, 10]], "labels": [1]}
    body.update(fields)
    return body
