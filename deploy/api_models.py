"""Request and response bodies of the control API (pydantic; FastAPI turns them into the OpenAPI schema).

Requests refuse unknown fields (a typo must not silently do nothing) and check everything a
PromptMessage checks, so a bad prompt is a 422 with a one-line reason instead of a rejected
message deep in the pipeline.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from masklet.actors.messages import CocoRle, PromptMessage

# Stream ids appear in URL paths and Kafka keys: keep them path-safe and short.
STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Only sources a remote caller may name: local files/folders and pull-style network streams.
# (open_source also knows udp/srt/rtmp listeners, which would open server ports: not via the API.)
ALLOWED_URL_SCHEMES = ("http", "https", "rtsp", "rtsps")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CreateStream(_Request):
    """Exactly one of `source` (file path, http(s) or rtsp URL) or `kafka_stream` (a frames-topic key)."""

    stream_id: str = Field(pattern=STREAM_ID_PATTERN, description="path-safe id, 1-64 characters")
    source: Optional[str] = Field(None, min_length=1, max_length=2048)
    kafka_stream: Optional[str] = Field(None, min_length=1, max_length=256,
                                        description="key of the stream's records on the frames topic")
    realtime: bool = Field(True, description="pace files at their frame rate, like a live camera")
    loop: bool = Field(False, description="restart a file at its end (demo feeds)")
    max_frames: Optional[int] = Field(None, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _one_source(self) -> "CreateStream":
        if (self.source is None) == (self.kafka_stream is None):
            raise ValueError("give exactly one of 'source' (file path or http(s)/rtsp URL) or 'kafka_stream'")
        if self.source is not None and "://" in self.source:
            scheme = self.source.split("://", 1)[0].lower()
            if scheme not in ALLOWED_URL_SCHEMES + ("file",):
                raise ValueError(f"source URL scheme {scheme!r} is not allowed; use a file path or "
                                 f"{', '.join(ALLOWED_URL_SCHEMES)}")
        return self


class _PromptBody(_Request):
    frame_idx: Optional[int] = Field(None, ge=0, description="frame the prompt applies to; default: latest frame")
    points: list[tuple[float, float]] = Field(default_factory=list, max_length=256,
                                              description="[[x, y], ...] in video pixels")
    labels: list[int] = Field(default_factory=list, max_length=256, description="1 positive, 0 negative")

    def to_prompt(self, stream_id: str, object_id: int, frame_idx: int, action: str) -> PromptMessage:
        fields = self.model_dump(exclude={"frame_idx", "object_id"})
        return PromptMessage(stream_id=stream_id, object_id=object_id, frame_idx=frame_idx, action=action, **fields)

    def _check_as(self, action: str) -> None:
        # Reuse PromptMessage's rules (labels per point, ordered box, action needs a prompt), so the
        # API and the Kafka prompts topic accept exactly the same prompts.
        try:
            self.to_prompt("check", 0, self.frame_idx or 0, action)
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


class AddObject(_PromptBody):
    """Start tracking an object from points, a box, or a mask (COCO RLE) on a named frame."""

    object_id: Optional[int] = Field(None, ge=0, le=1_000_000, description="default: the next free id")
    box: Optional[tuple[float, float, float, float]] = Field(None, description="[x0, y0, x1, y1] in video pixels")
    mask: Optional[CocoRle] = None

    @model_validator(mode="after")
    def _valid_prompt(self) -> "AddObject":
        self._check_as("add")
        return self


class RefineObject(_PromptBody):
    """Correction clicks on the object's mask at a frame (positive adds, negative removes)."""

    @model_validator(mode="after")
    def _valid_prompt(self) -> "RefineObject":
        self._check_as("refine")
        return self


class ObjectAccepted(BaseModel):
    stream_id: str
    object_id: int
    frame_idx: int
    action: Literal["add", "refine", "remove"]


class StreamSummary(BaseModel):
    stream_id: str
    source: str
    state: Literal["running", "finished", "failed"]
    error: Optional[str] = None


class StreamDetail(StreamSummary):
    width: int
    height: int
    fps: float
    frames_in: int
    frames_published: int
    frames_dropped: int
    lag_frames: int
    objects: dict[int, float] = Field(description="object id -> latest presence score (logit)")


class Health(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    ready: bool
    detail: str = ""
