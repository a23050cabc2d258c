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
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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

    def load_mask(self) -> Optional[np.ndarray]:
        """The mask prompt as bool [H, W], or None when this prompt has no mask."""
        if self.mask is None:
            return None
        try:
            with Image.open(self.mask) as image:
                return np.asarray(image.convert("L")) > 0
        except (OSError, ValueError) as exc:
            raise PromptSpecError(f"{self.describe()}: cannot read mask {self.mask}: {exc}") from None

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
            except (OSError, ValueError) as exc:
                raise PromptSpecError(f"{self.describe()}: cannot read mask {self.mask}: {exc}") from None
            if size != (width, height):
                raise PromptSpecError(
                    f"{self.describe()}: mask {self.mask} is {size[0]}x{size[1]}, the frame is {width}x{height}"
                )


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


def _read_prompts_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptSpecError(f"{path}: cannot read prompts file: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise PromptSpecError(f"{path}: invalid {kind}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise PromptSpecError(f"{path}: top level must be a mapping with an 'inputs' key")
    return data


def load_prompts_file(path: Union[str, Path], *, first_object_id: int = 1) -> dict[str, tuple[ObjectPrompt, ...]]:
    """Parse a prompts file into per-input prompts; objects without `id` are numbered from `first_object_id`."""
    path = Path(path)
    try:
        parsed = _PromptsFile.model_validate(_read_prompts_file(path))
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        location = ".".join(str(part) for part in error["loc"])
        raise PromptSpecError(f"{path}: {location}: {error['msg'].removeprefix('Value error, ')}") from None
    per_input: dict[str, tuple[ObjectPrompt, ...]] = {}
    # "*" objects join every input, so they are numbered first and their ids are reserved.
    ordered_keys = sorted(parsed.inputs, key=lambda key: key != "*")
    shared_ids: set[int] = set()
    for input_key in ordered_keys:
        prompts = _object_prompts(path, input_key, parsed.inputs[input_key], first_object_id, shared_ids)
        if input_key == "*":
            shared_ids = {prompt.object_id for prompt in prompts}
        per_input[input_key] = prompts
    return per_input


def _object_prompts(
    path: Path, input_key: str, objects: list[_ObjectEntry], first_object_id: int, reserved_ids: set[int]
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
        for entry in entries:
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
    points: Sequence[str] = (), boxes: Sequence[str] = (), prompts_file: Union[str, Path, None] = None
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
        per_input = load_prompts_file(prompts_file, first_object_id=len(shared) + 1)
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
