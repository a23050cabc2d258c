"""Prompts for offline jobs: `--point x,y[@frame]`, `--box x0,y0,x1,y1[@frame]` and `--prompts FILE`.

A `--point`/`--box` flag makes one object, applied to every input. A prompts file (JSON or YAML)
gives per-input objects with prompts on any frame:

```yaml
inputs:
  01_dog.mp4:                  # matched by path, file name or stem; "*" means every input
    - id: 1
      frame: 0
      points: [[640, 360], [100, 80]]
      labels: [1, 0]           # optional; all positive when omitted
    - id: 2
      prompts:                 # several prompts for one object, on different frames
        - {frame: 0, box: [10, 20, 200, 300]}
        - {frame: 40, mask: masks/dog_40.png}   # relative to the prompts file; non-zero = object
```
Checks that need the video (inside the frame, frame exists) run later in `validate_against`.
Bounded work (README "Limits", `InputLimits`): the file's size, nesting depth and points per
prompt are capped and YAML aliases refused before anything is built; a mask image's size is read
from its header and capped before its pixels are decoded (a decompression bomb is one line).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from masklet.actors.messages import MessageError, load_json
from masklet.actors.prompt_limits import InputLimits
from masklet.actors.safe_yaml import load_yaml
from masklet.actors.sources import DEFAULT_MAX_PIXELS


class PromptSpecError(ValueError):
    """A prompt is malformed or does not fit the input; the message is one user-facing line."""


@dataclass(frozen=True)
class ObjectPrompt:
    object_id: int
    frame_idx: int
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: Optional[tuple[float, float, float, float]] = None
    mask: Optional[Path] = None  # image file; non-zero pixels are the object

    def describe(self) -> str:
        return f"object {self.object_id} at frame {self.frame_idx}"

    def load_mask(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[np.ndarray]:
        """The mask prompt as bool [H, W], or None when this prompt has no mask.

        The size comes from the image header and must be at most `max_pixels` before any pixel is
        decoded; every failure (corrupt file, decompression bomb) is one PromptSpecError line.
        """
        if self.mask is None:
            return None
        try:
            with Image.open(self.mask) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise PromptSpecError(f"{self.describe()}: mask {self.mask} is {width}x{height}, over "
                                          f"{max_pixels} pixels")
                return np.asarray(image.convert("L")) > 0
        except PromptSpecError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types (DecompressionBombError is none of OSError/ValueError)
            raise PromptSpecError(f"{self.describe()}: cannot read mask {self.mask}: {_one_line(exc)}") from None

    def validate_against(self, width: int, height: int, num_frames: Optional[int]) -> None:
        """Raise PromptSpecError when the prompt falls outside the video (frame range or pixels)."""
        if num_frames is not None and self.frame_idx >= num_frames:
            raise PromptSpecError(f"{self.describe()}: the input has only {num_frames} frames")
        for x, y in self.points:
            if not (0 <= x <= width and 0 <= y <= height):
                raise PromptSpecError(f"{self.describe()}: point ({x:g}, {y:g}) is outside the {width}x{height} frame")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
                raise PromptSpecError(
                    f"{self.describe()}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {width}x{height} frame"
                )
        if self.mask is not None:
            try:
                with Image.open(self.mask) as image:
                    size = image.size
            except Exception as exc:  # noqa: BLE001 - as in load_mask
                raise PromptSpecError(f"{self.describe()}: cannot read mask {self.mask}: {_one_line(exc)}") from None
            if size != (width, height):
                raise PromptSpecError(
                    f"{self.describe()}: mask {self.mask} is {size[0]}x{size[1]}, the frame is {width}x{height}"
                )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def validate_prompts(prompts: Iterable[ObjectPrompt], width: int, height: int, num_frames: Optional[int]) -> None:
    for prompt in prompts:
        prompt.validate_against(width, height, num_frames)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _parse_flag(flag: str, text: str, arity: int) -> tuple[tuple[float, ...], int]:
    pattern = rf"\s*({_NUMBER}(?:\s*,\s*{_NUMBER}){{{arity - 1}}})\s*(?:@\s*(\d+))?\s*"
    match = re.fullmatch(pattern, text)
    if match is None:
        usage = "x,y[@frame]" if arity == 2 else "x0,y0,x1,y1[@frame]"
        raise PromptSpecError(f"--{flag} {text!r}: expected {usage} with numbers, e.g. --{flag} {_example(arity)}")
    values = tuple(float(part) for part in match.group(1).split(","))
    return values, int(match.group(2) or 0)


def _example(arity: int) -> str:
    return "320,240@0" if arity == 2 else "100,50,400,300@0"


def parse_point_flag(text: str, object_id: int) -> ObjectPrompt:
    """`--point x,y[@frame]`: one positive click for a new object."""
    (x, y), frame_idx = _parse_flag("point", text, 2)
    return ObjectPrompt(object_id=object_id, frame_idx=frame_idx, points=((x, y),), labels=(1,))


def parse_box_flag(text: str, object_id: int) -> ObjectPrompt:
    """`--box x0,y0,x1,y1[@frame]`: a box prompt for a new object."""
    (x0, y0, x1, y1), frame_idx = _parse_flag("box", text, 4)
    if not (x0 < x1 and y0 < y1):
        raise PromptSpecError(f"--box {text!r}: needs x0 < x1 and y0 < y1")
    return ObjectPrompt(object_id=object_id, frame_idx=frame_idx, box=(x0, y0, x1, y1))


class _PromptEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    frame: int = Field(0, ge=0)
    points: list[tuple[float, float]] = Field(default_factory=list)
    labels: Optional[list[int]] = None
    box: Optional[tuple[float, float, float, float]] = None
    mask: Optional[str] = None

    @model_validator(mode="after")
    def _consistent(self) -> "_PromptEntry":
        if not self.points and self.box is None and self.mask is None:
            raise ValueError("needs points, a box or a mask")
        if self.labels is not None:
            if len(self.labels) != len(self.points):
                raise ValueError(f"{len(self.points)} points need {len(self.points)} labels, got {len(self.labels)}")
            if any(label not in (0, 1) for label in self.labels):
                raise ValueError("labels must be 1 (positive) or 0 (negative)")
        if self.box is not None and not (self.box[0] < self.box[2] and self.box[1] < self.box[3]):
            raise ValueError(f"box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {list(self.box)}")
        return self


class _ObjectEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    id: Optional[int] = Field(None, ge=0)
    frame: Optional[int] = Field(None, ge=0)
    points: Optional[list[tuple[float, float]]] = None
    labels: Optional[list[int]] = None
    box: Optional[tuple[float, float, float, float]] = None
    mask: Optional[str] = None
    prompts: Optional[list[_PromptEntry]] = None

    def entries(self) -> list[_PromptEntry]:
        inline = {k: v for k, v in self.model_dump(exclude={"id", "prompts"}).items() if v is not None}
        if self.prompts is not None:
            if inline:
                raise ValueError("give either 'prompts' or inline frame/points/labels/box/mask, not both")
            if not self.prompts:
                raise ValueError("'prompts' is empty")
            return list(self.prompts)
        return [_PromptEntry.model_validate(inline)]


class _PromptsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: dict[str, list[_ObjectEntry]]


@dataclass(frozen=True)
class PromptSpec:
    """All prompts of a job: `shared` apply to every input, `per_input` by input key."""

    shared: tuple[ObjectPrompt, ...] = ()
    per_input: dict[str, tuple[ObjectPrompt, ...]] = field(default_factory=dict)

    def prompts_for(self, input_path: Union[str, Path]) -> tuple[ObjectPrompt, ...]:
        """Shared prompts plus those whose key equals the input's path, file name or stem (or "*")."""
        path = Path(input_path)
        chosen = list(self.shared) + list(self.per_input.get("*", ()))
        for key in (str(input_path), path.name, path.stem):
            if key in self.per_input:
                chosen.extend(self.per_input[key])
                break
        return tuple(sorted(chosen, key=lambda p: (p.frame_idx, p.object_id)))

    def object_ids_for(self, input_path: Union[str, Path]) -> list[int]:
        return sorted({prompt.object_id for prompt in self.prompts_for(input_path)})

    def check_object_limits(self, inputs: Sequence[Union[str, Path]], limits: InputLimits) -> None:
        """Objects per input (one stream) and over all inputs (the run) within the limits; else one line."""
        total = 0
        for input_path in inputs:
            count = len(self.object_ids_for(input_path))
            if count > limits.max_objects_per_stream:
                raise PromptSpecError(f"{input_path}: {count} objects, at most {limits.max_objects_per_stream} per "
                                      f"input (limits.max_objects_per_stream)")
            total += count
        if total > limits.max_objects_per_run:
            raise PromptSpecError(f"{total} objects over all inputs, at most {limits.max_objects_per_run} per run "
                                  f"(limits.max_objects_per_run)")


def _read_prompts_file(path: Path, limits: InputLimits) -> dict:
    cap = limits.max_prompts_file_bytes
    try:
        with open(path, "rb") as handle:
            raw = handle.read(cap + 1)  # never more, whatever the file claims to be
        text = raw.decode("utf-8")
    except OSError as exc:
        raise PromptSpecError(f"{path}: cannot read prompts file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PromptSpecError(f"{path}: prompts file is not UTF-8 text (byte {exc.start})") from None
    if len(raw) > cap:
        raise PromptSpecError(f"{path}: prompts file is over {cap} bytes (limits.max_prompts_file_bytes)")
    try:
        if path.suffix.lower() == ".json":
            data = load_json(text, limits.max_nesting_depth, what=f"{path}")
        else:
            data = load_yaml(text, limits.max_nesting_depth, what=f"{path}")
    except MessageError as exc:
        raise PromptSpecError(_one_line(exc)) from None
    if not isinstance(data, dict):
        raise PromptSpecError(f"{path}: top level must be a mapping with an 'inputs' key")
    return data


def load_prompts_file(path: Union[str, Path], *, first_object_id: int = 1,
                      limits: InputLimits = InputLimits()) -> dict[str, tuple[ObjectPrompt, ...]]:
    """Parse a prompts file into per-input prompts; objects without `id` are numbered from `first_object_id`."""
    path = Path(path)
    try:
        parsed = _PromptsFile.model_validate(_read_prompts_file(path, limits))
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        location = ".".join(str(part) for part in error["loc"])
        raise PromptSpecError(f"{path}: {location}: {error['msg'].removeprefix('Value error, ')}") from None
    per_input: dict[str, tuple[ObjectPrompt, ...]] = {}
    # "*" objects join every input, so they are numbered first and their ids are reserved.
    ordered_keys = sorted(parsed.inputs, key=lambda key: key != "*")
    shared_ids: set[int] = set()
    for input_key in ordered_keys:
        prompts = _object_prompts(path, input_key, parsed.inputs[input_key], first_object_id, shared_ids, limits)
        if input_key == "*":
            shared_ids = {prompt.object_id for prompt in prompts}
        per_input[input_key] = prompts
    return per_input


def _object_prompts(
    path: Path, input_key: str, objects: list[_ObjectEntry], first_object_id: int, reserved_ids: set[int],
    limits: InputLimits,
) -> tuple[ObjectPrompt, ...]:
    prompts: list[ObjectPrompt] = []
    explicit = {obj.id for obj in objects if obj.id is not None}
    clash = sorted(explicit & reserved_ids)
    if clash:
        raise PromptSpecError(f"{path}: inputs.{input_key}: object id {clash[0]} is already used under '*'")
    taken = explicit | reserved_ids
    next_id = first_object_id
    for position, obj in enumerate(objects):
        where = f"{path}: inputs.{input_key}.{position}"
        if obj.id is None:
            while next_id in taken:
                next_id += 1
            object_id, next_id = next_id, next_id + 1
        else:
            object_id = obj.id
        try:
            entries = obj.entries()
        except (ValueError, ValidationError) as exc:
            message = exc.errors(include_url=False)[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise PromptSpecError(f"{where}: {message.removeprefix('Value error, ')}") from None
        if object_id > limits.max_object_id:
            raise PromptSpecError(f"{where}: object id {object_id} is over {limits.max_object_id}")
        for entry in entries:
            if len(entry.points) > limits.max_points_per_prompt:
                raise PromptSpecError(f"{where}: {len(entry.points)} points in one prompt, at most "
                                      f"{limits.max_points_per_prompt} (limits.max_points_per_prompt)")
            labels = entry.labels if entry.labels is not None else [1] * len(entry.points)
            mask = (path.parent / entry.mask) if entry.mask is not None else None
            prompts.append(ObjectPrompt(object_id, entry.frame, tuple(entry.points), tuple(labels), entry.box, mask))
    frames_by_object: dict[int, list[int]] = {}
    for prompt in prompts:
        frames_by_object.setdefault(prompt.object_id, []).append(prompt.frame_idx)
    for object_id, frames in frames_by_object.items():
        if len(set(frames)) != len(frames):
            raise PromptSpecError(f"{path}: inputs.{input_key}: object {object_id} has two prompts on one frame; merge them")
    return tuple(prompts)


def build_prompt_spec(
    points: Sequence[str] = (), boxes: Sequence[str] = (), prompts_file: Union[str, Path, None] = None,
    limits: InputLimits = InputLimits(),
) -> PromptSpec:
    """Combine CLI flags (objects 1..n: points first, then boxes) with an optional prompts file.

    File objects without an explicit id are numbered after the flag objects; an explicit file id
    that collides with a flag object is an error.
    """
    shared: list[ObjectPrompt] = []
    for text in points:
        shared.append(parse_point_flag(text, object_id=len(shared) + 1))
    for text in boxes:
        shared.append(parse_box_flag(text, object_id=len(shared) + 1))
    per_input: dict[str, tuple[ObjectPrompt, ...]] = {}
    if prompts_file is not None:
        per_input = load_prompts_file(prompts_file, first_object_id=len(shared) + 1, limits=limits)
        flag_ids = {prompt.object_id for prompt in shared}
        for input_key, prompts in per_input.items():
            clash = sorted(flag_ids & {prompt.object_id for prompt in prompts})
            if clash:
                raise PromptSpecError(
                    f"{prompts_file}: inputs.{input_key}: object id {clash[0]} is already used by a --point/--box flag"
                )
    if not shared and not per_input:
        raise PromptSpecError("no prompts: give --point, --box or --prompts FILE")
    return PromptSpec(shared=tuple(shared), per_input=per_input)
