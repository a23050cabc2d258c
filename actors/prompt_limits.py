"""Bounded work per input: the limits an external prompt is held to, and the one conversion from a
wire `PromptMessage` to a model `Prompt` that applies them all (README "Limits").

    prompt = prompt_to_model(message, height, width, limits)   # raises PromptLimitError

Every check runs before any pixel is allocated: the number of points, the mask's declared size
against the stream's frame size (a 65-byte `{"size": [50000, 50000], "counts": ""}` used to be
decoded first), then the coordinates. `PromptLimitError.reason` is a short code for dead letters,
HTTP details and metrics; `detail` is one line for a person.

The values come from the `limits` section of the settings (`pipeline.config.LimitsSettings`,
`settings.limits.input_limits()`); the defaults here are the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Literal

import numpy as np

from masklet.actors.messages import MAX_JSON_DEPTH, PromptMessage
from masklet.actors.rle import RleError, check_rle, decode_rle

if TYPE_CHECKING:
    # Imported where used: `masklet.model` pulls in torch, and this module is imported by processes
    # that never build a prompt (pipeline.config is everywhere, a source reader actor among them).
    from masklet.model.types import Prompt

PromptLimitReason = Literal["invalid_prompt", "out_of_range", "too_large", "too_many_objects"]


@dataclass(frozen=True)
class InputLimits:
    """Per-input work bounds, enforced by actors/, pipeline/ and deploy/ alike."""

    # Points of one prompt: SAM 2 embeds each as a token; 100,000 stalled every stream for 5 min.
    max_points_per_prompt: int = 64
    # Objects are rows of pooled tracker actors, ~21 MB each (bench/results/objects_bench.json), but
    # each costs a memory-attention pass per frame: these bound the work one stream or run can buy.
    max_objects_per_stream: int = 16
    max_objects_per_run: int = 64
    max_object_id: int = 1_000_000
    # Encoded prompt record / API prompt body (an RLE mask of a 4K frame fits easily).
    max_prompt_bytes: int = 4 * 1024 * 1024
    # `segment --prompts FILE`: read at most this much; masks are separate image files.
    max_prompts_file_bytes: int = 1024 * 1024
    # Lists/objects inside lists/objects, for JSON and YAML alike.
    max_nesting_depth: int = MAX_JSON_DEPTH
    # Kafka gate: a frame more than this many indices after its stream's newest frame is a dead
    # letter, unless `frame_gap_resync` frames in a row agree on the new position (a producer
    # that really jumped ahead). ~55 minutes at 30 fps.
    max_frame_gap: int = 100_000
    frame_gap_resync: int = 3

    def __post_init__(self) -> None:
        for name in ("max_points_per_prompt", "max_objects_per_stream", "max_objects_per_run", "max_object_id",
                     "max_prompt_bytes", "max_prompts_file_bytes", "max_nesting_depth", "max_frame_gap",
                     "frame_gap_resync"):
            if getattr(self, name) < 1:
                raise ValueError(f"InputLimits.{name} must be at least 1, got {getattr(self, name)}")


class PromptLimitError(ValueError):
    """A prompt refused before it costs anything: `reason` is a code, `detail` one line."""

    def __init__(self, reason: PromptLimitReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_prompt(msg: PromptMessage, height: int | None, width: int | None,
                 limits: InputLimits = InputLimits()) -> None:
    """Every check of `prompt_to_model` that needs no pixels; the frame checks only with a known size.

    Cheap (no decoding), so a consumer can run it on every record, before the stream is known too.
    """
    if msg.object_id > limits.max_object_id:
        raise PromptLimitError("out_of_range", f"object_id {msg.object_id} is over {limits.max_object_id}")
    if len(msg.points) > limits.max_points_per_prompt:
        raise PromptLimitError("too_large", f"{len(msg.points)} points, at most {limits.max_points_per_prompt} "
                                            f"per prompt")
    if len(msg.labels) != len(msg.points) or any(label not in (0, 1) for label in msg.labels):
        raise PromptLimitError("invalid_prompt", "labels must be one 0 or 1 per point")
    if msg.mask is not None and (msg.points or msg.box is not None):
        raise PromptLimitError("invalid_prompt", "a mask prompt cannot be combined with points or a box")
    if height is not None and width is not None and msg.mask is not None and tuple(msg.mask.size) != (height, width):
        raise PromptLimitError("out_of_range", f"mask size {list(msg.mask.size)} != frame [{height}, {width}]")
    if msg.mask is not None:
        try:  # the counts string's structure and run total, without allocating the mask
            check_rle({"size": list(msg.mask.size), "counts": msg.mask.counts})
        except RleError as exc:
            raise PromptLimitError("invalid_prompt", str(exc)) from None
    if height is None or width is None:
        return
    for x, y in msg.points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise PromptLimitError("out_of_range", f"point ({x:g}, {y:g}) is outside the {width}x{height} frame")
    if msg.box is not None:
        x0, y0, x1, y1 = msg.box
        if not (0 <= x0 <= width and 0 <= x1 <= width and 0 <= y0 <= height and 0 <= y1 <= height):
            raise PromptLimitError("out_of_range",
                                   f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {width}x{height} frame")


def prompt_to_model(msg: PromptMessage, height: int, width: int, limits: InputLimits = InputLimits()) -> Prompt:
    """The model Prompt of an add/refine message for a stream of frames `height` x `width`.

    Raises PromptLimitError ("invalid_prompt", "out_of_range", "too_large") and nothing else.
    """
    if msg.action == "remove":
        raise PromptLimitError("invalid_prompt", "action 'remove' carries no prompt")
    check_prompt(msg, height, width, limits)
    mask = None
    if msg.mask is not None:
        try:  # the size matched above; decode_rle checks it again before allocating
            mask = decode_rle({"size": list(msg.mask.size), "counts": msg.mask.counts}, expected_size=(height, width))
        except RleError as exc:
            raise PromptLimitError("invalid_prompt", str(exc)) from None
    from masklet.model.types import Prompt

    try:
        return Prompt(points=np.asarray(msg.points, np.float32) if msg.points else None,
                      labels=np.asarray(msg.labels, np.int64) if msg.points else None,
                      box=None if msg.box is None else np.asarray(msg.box, np.float32), mask=mask)
    except ValueError as exc:
        raise PromptLimitError("invalid_prompt", str(exc)) from None


def check_object_count(object_id: int, stream_objects: Collection[int], run_objects: int,
                       limits: InputLimits = InputLimits()) -> None:
    """Refuse a NEW object when its stream or the whole run is at its object cap.

    `stream_objects`: ids of the stream's live objects; `run_objects`: live objects of all streams.
    An object already in `stream_objects` (a re-prompt or refine) always passes.
    """
    if object_id in stream_objects:
        return
    if len(stream_objects) >= limits.max_objects_per_stream:
        raise PromptLimitError("too_many_objects", f"the stream has {len(stream_objects)} objects, the limit "
                                                   f"(limits.max_objects_per_stream) is {limits.max_objects_per_stream}")
    if run_objects >= limits.max_objects_per_run:
        raise PromptLimitError("too_many_objects", f"{run_objects} objects are tracked in all, the limit "
                                                   f"(limits.max_objects_per_run) is {limits.max_objects_per_run}")
