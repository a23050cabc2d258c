"""Schema-versioned wire messages (design.md "Messages"). JSON or image bytes only, never pickle.

Every JSON message carries `"schema": "<kind>/v<N>"`; a reader refuses versions it does not know
with one clear line instead of guessing at fields.
"""
from __future__ import annotations

import json
import math
import re
import time
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FRAME_SCHEMA = "frame/v1"
PROMPT_SCHEMA = "prompt/v1"
MASKLET_SCHEMA = "masklet/v1"
DEADLETTER_SCHEMA = "deadletter/v1"

# Deepest JSON nesting a message may have (prompt/v1 needs 3: object, points, point). Python's
# json module recurses per level and raises RecursionError near 1,000, which is no reason a
# consumer should ever see: deeper documents are refused with one line.
MAX_JSON_DEPTH = 32
# Frame and object indices stay exact in every JSON reader (JavaScript's Number.MAX_SAFE_INTEGER).
MAX_SAFE_INT = 2**53 - 1

ImageContentType = Literal["image/jpeg", "image/png"]
KafkaHeaders = list[tuple[str, bytes]]


class MessageError(ValueError):
    """A message could not be parsed or validated; the message is one user-facing line."""


def _describe(exc: ValidationError, shown: int = 5) -> str:
    """The first `shown` problems, one line: a record with 100,000 bad points is one short line too."""
    errors = exc.errors(include_url=False)
    problems = []
    for error in errors[:shown]:
        location = ".".join(str(part) for part in error["loc"]) or "(message)"
        problems.append(f"{location}: {error['msg'].removeprefix('Value error, ')}")
    if len(errors) > shown:
        problems.append(f"and {len(errors) - shown} more")
    return "; ".join(problems)


class _Message(BaseModel):
    # NaN/Infinity are not JSON; strict consumers (Java, Go, browsers) would reject the record.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)
    SCHEMA: ClassVar[str]

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode("utf-8")

    @classmethod
    def from_json_bytes(cls, data: Union[bytes, bytearray, memoryview, str], *, max_depth: int = MAX_JSON_DEPTH):
        return cls.from_payload(_load_json_object(data, cls.SCHEMA, max_depth))

    @classmethod
    def from_payload(cls, payload: dict[str, Any]):
        """Validate an already parsed JSON object (a consumer may look at its size first)."""
        found = payload.get("schema")
        if found != cls.SCHEMA:
            raise MessageError(f"unsupported schema {found!r}: expected {cls.SCHEMA!r}")
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise MessageError(f"invalid {cls.SCHEMA} message: {_describe(exc)}") from None


def _load_json_object(data: Union[bytes, bytearray, memoryview, str], expected: str,
                      max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    payload = load_json(data, max_depth, what=f"{expected} message")
    if not isinstance(payload, dict):
        raise MessageError(f"{expected} message must be a JSON object, got {type(payload).__name__}")
    if "schema" not in payload:
        raise MessageError(f'{expected} message has no "schema" field')
    return payload


class MessageTooLarge(MessageError):
    """A JSON document holds more values than its reader allows (refused before it is parsed)."""


def load_json(data: Union[bytes, bytearray, memoryview, str], max_depth: int = MAX_JSON_DEPTH, *,
              max_values: Optional[int] = None, what: str = "JSON document") -> Any:
    """json.loads with every failure as one MessageError line, nesting limited to `max_depth`.

    Depth and size are measured on the text before parsing (C speed: a regex blanks the string
    literals, numpy counts brackets and commas), so a deep document costs no recursion, and one of
    a million tiny values (`max_values`, raising MessageTooLarge) costs no parsing at all.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth, values = json_shape(raw)
    if depth > max_depth:
        raise MessageError(f"{what} is nested deeper than {max_depth} levels")
    if max_values is not None and values > max_values:
        raise MessageTooLarge(f"{what} holds about {values} values, at most {max_values}")
    try:
        return json.loads(data if isinstance(data, str) else raw)
    except RecursionError:  # unreachable for max_depth <= ~900; kept so it can never escape
        raise MessageError(f"{what} is nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageError(f"{what} is not valid JSON: {exc}") from None


# A JSON string literal: quote, then runs of ordinary characters or escapes (linear, no backtracking).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def json_shape(raw: bytes) -> tuple[int, int]:
    """(deepest nesting of [ ] and { }, number of values ~ commas + 1), outside string literals.

    Exact depth for valid JSON; the value count is an upper bound on list items and fields.
    """
    text = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = (text == ord("[")).astype(np.int8) + (text == ord("{")) - (text == ord("]")) - (text == ord("}"))
    depth = int(np.cumsum(step, dtype=np.int64).max(initial=0))
    return depth, int(np.count_nonzero(text == ord(","))) + 1


class CocoRle(BaseModel):
    """COCO compressed RLE as JSON: `size` is [height, width], `counts` the compressed string."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    size: tuple[int, int]
    counts: str

    @field_validator("size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if size[0] <= 0 or size[1] <= 0:
            raise ValueError(f"size must be positive [height, width], got {list(size)}")
        return size


class FrameHeaders(_Message):
    """Kafka headers of a `frames` message; the value is the encoded image, the key the stream_id."""

    SCHEMA: ClassVar[str] = FRAME_SCHEMA
    schema_version: Literal["frame/v1"] = Field(FRAME_SCHEMA, alias="schema")
    frame_idx: int = Field(ge=0, le=MAX_SAFE_INT)
    pts: float
    content_type: ImageContentType

    def to_kafka_headers(self) -> KafkaHeaders:
        return [
            ("schema", self.schema_version.encode()),
            ("frame_idx", str(self.frame_idx).encode()),
            ("pts", repr(float(self.pts)).encode()),
            ("content_type", self.content_type.encode()),
        ]

    @classmethod
    def from_kafka_headers(cls, headers: Optional[Sequence[tuple[str, Union[bytes, str, None]]]]) -> "FrameHeaders":
        """Parse kafka-python's `record.headers`; unrelated extra headers (tracing etc.) are ignored."""
        values: dict[str, str] = {}
        for key, raw in headers or []:
            if key in ("schema", "frame_idx", "pts", "content_type"):
                if raw is None:
                    raise MessageError(f"frame header {key!r} has no value")
                try:
                    values[key] = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
                except UnicodeDecodeError:
                    raise MessageError(f"frame header {key!r} is not UTF-8") from None
        if "schema" not in values:
            raise MessageError('frame message has no "schema" header')
        if values["schema"] != FRAME_SCHEMA:
            raise MessageError(f"unsupported frame schema {values['schema']!r}: expected {FRAME_SCHEMA!r}")
        missing = [key for key in ("frame_idx", "pts", "content_type") if key not in values]
        if missing:
            raise MessageError(f"frame message lacks header(s) {', '.join(missing)}")
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise MessageError(f"invalid frame headers: {_describe(exc)}") from None


Point = tuple[float, float]


class PromptMessage(_Message):
    """A prompt for one object of one stream, applied at `frame_idx`."""

    SCHEMA: ClassVar[str] = PROMPT_SCHEMA
    schema_version: Literal["prompt/v1"] = Field(PROMPT_SCHEMA, alias="schema")
    stream_id: str = Field(min_length=1, max_length=256)
    object_id: int = Field(ge=0, le=MAX_SAFE_INT)
    frame_idx: int = Field(ge=0, le=MAX_SAFE_INT)
    action: Literal["add", "refine", "remove"]
    points: list[Point] = Field(default_factory=list)
    labels: list[int] = Field(default_factory=list)
    box: Optional[tuple[float, float, float, float]] = None
    mask: Optional[CocoRle] = None

    @field_validator("labels")
    @classmethod
    def _binary_labels(cls, labels: list[int]) -> list[int]:
        bad = [label for label in labels if label not in (0, 1)]
        if bad:
            raise ValueError(f"labels must be 1 (positive) or 0 (negative), got {bad[0]}")
        return labels

    @field_validator("box")
    @classmethod
    def _ordered_box(cls, box):
        if box is not None and not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {list(box)}")
        return box

    @model_validator(mode="after")
    def _prompt_matches_action(self) -> "PromptMessage":
        if len(self.labels) != len(self.points):
            raise ValueError(f"{len(self.points)} points need {len(self.points)} labels, got {len(self.labels)}")
        has_prompt = bool(self.points) or self.box is not None or self.mask is not None
        if self.action == "add" and not has_prompt:
            raise ValueError("action 'add' needs points, a box or a mask")
        if self.action == "refine" and not self.points:
            raise ValueError("action 'refine' needs correction clicks (points with labels)")
        if self.action == "remove" and has_prompt:
            raise ValueError("action 'remove' takes no points, box or mask")
        return self


class ObjectMask(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    object_id: int = Field(ge=0)
    rle: CocoRle
    bbox: tuple[int, int, int, int]  # pixel-aligned, as masks are
    area: int = Field(ge=0)
    score: float  # object-presence logit (SAM 2 uses -1024 for "no object", finite)
    iou: float
    present: bool

    @field_validator("bbox")
    @classmethod
    def _non_negative_bbox(cls, bbox):
        if any(value < 0 or math.isnan(value) for value in bbox):
            raise ValueError(f"bbox must be [x, y, w, h] with non-negative values, got {list(bbox)}")
        return bbox


class MaskletRecord(_Message):
    """One record per (stream, frame); `(stream_id, frame_idx)` identifies it for de-duplication."""

    SCHEMA: ClassVar[str] = MASKLET_SCHEMA
    schema_version: Literal["masklet/v1"] = Field(MASKLET_SCHEMA, alias="schema")
    stream_id: str = Field(min_length=1, max_length=256)
    frame_idx: int = Field(ge=0)
    pts: float
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    model: str
    dropped_frames_since_last: int = Field(0, ge=0)
    # Frames of this stream that never arrived (gaps in frame_idx, e.g. lost by a broker) since the last record.
    lost_frames_since_last: int = Field(0, ge=0)
    # 0 for the first record of a frame; a later prompt that changes an already published frame
    # republishes it with a higher revision. Consumers keep the highest per (stream_id, frame_idx).
    revision: int = Field(0, ge=0)
    objects: list[ObjectMask] = Field(default_factory=list)

    @model_validator(mode="after")
    def _objects_fit_frame(self) -> "MaskletRecord":
        seen: set[int] = set()
        for obj in self.objects:
            if tuple(obj.rle.size) != (self.height, self.width):
                raise ValueError(
                    f"object {obj.object_id} RLE size {list(obj.rle.size)} != frame [{self.height}, {self.width}]"
                )
            if obj.object_id in seen:
                raise ValueError(f"object {obj.object_id} appears twice")
            seen.add(obj.object_id)
        return self

    @property
    def record_id(self) -> tuple[str, int]:
        return (self.stream_id, self.frame_idx)

    def kafka_key(self) -> bytes:
        return self.stream_id.encode("utf-8")


DeadLetterReason = Literal[
    "undecodable_frame",
    "frame_too_large",
    "bad_frame_headers",
    "malformed_prompt",
    "unknown_schema",
    "unknown_stream",
    "out_of_order",
    "internal_error",
]


class DeadLetter(_Message):
    """Why an input message was set aside; the stream goes on without it."""

    SCHEMA: ClassVar[str] = DEADLETTER_SCHEMA
    schema_version: Literal["deadletter/v1"] = Field(DEADLETTER_SCHEMA, alias="schema")
    reason: DeadLetterReason
    detail: str
    source_topic: Optional[str] = None
    source_partition: Optional[int] = Field(None, ge=0)
    source_offset: Optional[int] = Field(None, ge=0)
    stream_id: Optional[str] = None
    # Header values are kept as text (undecodable bytes escaped) so the record stays plain JSON.
    original_headers: list[tuple[str, str]] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)

    @staticmethod
    def headers_as_text(headers: Optional[Sequence[tuple[str, Union[bytes, str, None]]]]) -> list[tuple[str, str]]:
        text = []
        for key, value in headers or []:
            if isinstance(value, (bytes, bytearray)):
                value = bytes(value).decode("utf-8", errors="backslashreplace")
            text.append((str(key), "" if value is None else str(value)))
        return text


_BY_SCHEMA: dict[str, type[_Message]] = {
    PROMPT_SCHEMA: PromptMessage,
    MASKLET_SCHEMA: MaskletRecord,
    DEADLETTER_SCHEMA: DeadLetter,
}


def parse_message(data: Union[bytes, bytearray, memoryview, str], *,
                  max_depth: int = MAX_JSON_DEPTH) -> Union[PromptMessage, MaskletRecord, DeadLetter]:
    """Parse any JSON message by its `schema` field."""
    payload = _load_json_object(data, "JSON", max_depth)
    schema = payload["schema"]
    message_cls = _BY_SCHEMA.get(schema) if isinstance(schema, str) else None
    if message_cls is None:
        raise MessageError(f"unsupported schema {schema!r}: expected one of {', '.join(_BY_SCHEMA)}")
    try:
        return message_cls.model_validate(payload)  # type: ignore[return-value]
    except ValidationError as exc:
        raise MessageError(f"invalid {schema} message: {_describe(exc)}") from None
