"""Output sinks for offline jobs: masklets JSONL, lossless per-object mask videos, soft alpha
mattes and an H.264 preview overlay.

Every sink has `open()`, `write(frame)` and `close()`. None of them raises on an output problem:
each returns a `SinkError` (or None) that the caller records before going on with the next
frame. Every input frame is written, with empty masks when no object is tracked, so each output
has the input's frame count.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from masklet.actors.messages import MaskletRecord
from masklet.actors.rle import decode_rle

if TYPE_CHECKING:
    from masklet.actors.payloads import StreamInfo

# Distinct, saturated colours; object ids index into this cyclically.
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
        (70, 240, 240), (245, 130, 48), (240, 50, 230), (210, 245, 60), (0, 128, 128),
    ],
    dtype=np.uint8,
)


@dataclass(frozen=True)
class SinkError:
    """A sink failed to open, write a frame or close; the job goes on."""

    sink: str
    frame_idx: Optional[int]
    reason: str

    def __str__(self) -> str:
        where = f" frame {self.frame_idx}" if self.frame_idx is not None else ""
        return f"{self.sink}{where}: {self.reason}"


@dataclass(frozen=True)
class FrameOutput:
    """Everything the sinks need for one frame.

    `masks` (bool [H, W] per object id) and `logits` (float [H, W], source resolution) are
    optional: masks are decoded from the record's RLE when missing; the alpha sink falls back
    to the hard mask when an object has no logits. `rgb` is needed only by the preview.
    """

    record: MaskletRecord
    rgb: Optional[np.ndarray] = field(default=None, repr=False)
    masks: Mapping[int, np.ndarray] = field(default_factory=dict, repr=False)
    logits: Mapping[int, np.ndarray] = field(default_factory=dict, repr=False)

    def mask_of(self, object_id: int) -> np.ndarray:
        if object_id in self.masks:
            return np.asarray(self.masks[object_id], dtype=bool)
        for obj in self.record.objects:
            if obj.object_id == object_id:
                return decode_rle(obj.rle.model_dump())
        return np.zeros((self.record.height, self.record.width), dtype=bool)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


class Sink(ABC):
    """Template: subclasses implement `_open/_write/_close`; the public methods turn errors into SinkError."""

    name: str = "sink"

    def open(self) -> Optional[SinkError]:
        try:
            self._open()
        except Exception as exc:
            return SinkError(self.name, None, _one_line(exc))
        return None

    def write(self, frame: FrameOutput) -> Optional[SinkError]:
        try:
            self._write(frame)
        except Exception as exc:
            return SinkError(self.name, frame.record.frame_idx, _one_line(exc))
        return None

    def close(self) -> Optional[SinkError]:
        try:
            self._close()
        except Exception as exc:
            return SinkError(self.name, None, _one_line(exc))
        return None

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _write(self, frame: FrameOutput) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...


class JsonlSink(Sink):
    """`masklets.jsonl`: one masklet/v1 record per line, flushed per record so a crash loses none."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = str(self.path)
        self._file = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("wb")

    def _write(self, frame: FrameOutput) -> None:
        if self._file is None:
            raise RuntimeError("sink is not open")
        self._file.write(frame.record.to_json_bytes() + b"\n")
        self._file.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _frame_rate(fps: float) -> Fraction:
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return Fraction(fps).limit_denominator(1001)


class _VideoWriter:
    """One PyAV output stream; frames get consecutive pts at the given rate."""

    def __init__(self, path: Path, codec: str, pix_fmt: str, width: int, height: int, fps: float, options=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.size = (width, height)
        self._container = av.open(str(path), "w")
        try:
            self._stream = self._container.add_stream(codec, rate=_frame_rate(fps), options=options or {})
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, pix_fmt
        except Exception:
            self._container.close()
            raise
        self.frames_written = 0

    def write(self, array: np.ndarray, array_format: str) -> None:
        if (array.shape[1], array.shape[0]) != self.size:
            raise ValueError(f"frame is {array.shape[1]}x{array.shape[0]}, the video is {self.size[0]}x{self.size[1]}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=array_format)
        frame.pts = self.frames_written
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()


class _PerObjectLosslessSink(Sink):
    """One FFV1 gray8 .mkv per object; objects appearing late are back-filled with empty frames."""

    suffix = "mask"

    def __init__(self, out_dir: Path, fps: float):
        self.out_dir = Path(out_dir)
        self.fps = fps
        self.name = f"{self.out_dir}/object_*_{self.suffix}.mkv"
        self._writers: dict[int, _VideoWriter] = {}
        self._frames_seen = 0
        self._size: Optional[tuple[int, int]] = None

    @property
    def paths(self) -> dict[int, Path]:
        return {object_id: writer.path for object_id, writer in self._writers.items()}

    def path_for(self, object_id: int) -> Path:
        return self.out_dir / f"object_{object_id}_{self.suffix}.mkv"

    def _open(self) -> None:
        _frame_rate(self.fps)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @abstractmethod
    def _plane(self, frame: FrameOutput, object_id: int) -> np.ndarray: ...

    def _write(self, frame: FrameOutput) -> None:
        record = frame.record
        size = (record.width, record.height)
        self._size = self._size or size
        failures = []
        for obj in record.objects:
            if obj.object_id not in self._writers:
                try:
                    self._start_writer(obj.object_id)
                except Exception as exc:
                    failures.append(f"object {obj.object_id}: {_one_line(exc)}")
        tracked = {obj.object_id for obj in record.objects}
        for object_id, writer in self._writers.items():
            try:
                if object_id in tracked:
                    plane = self._plane(frame, object_id)
                else:
                    plane = np.zeros((record.height, record.width), dtype=np.uint8)
                writer.write(plane, "gray")
            except Exception as exc:
                failures.append(f"object {object_id}: {_one_line(exc)}")
        self._frames_seen += 1
        if failures:
            raise RuntimeError("; ".join(failures))

    def _start_writer(self, object_id: int) -> None:
        width, height = self._size  # type: ignore[misc]
        writer = _VideoWriter(self.path_for(object_id), "ffv1", "gray", width, height, self.fps)
        self._writers[object_id] = writer
        empty = np.zeros((height, width), dtype=np.uint8)
        for _ in range(self._frames_seen):
            writer.write(empty, "gray")

    def _close(self) -> None:
        failures = []
        for object_id, writer in self._writers.items():
            try:
                writer.close()
            except Exception as exc:
                failures.append(f"object {object_id}: {_one_line(exc)}")
        if failures:
            raise RuntimeError("; ".join(failures))


class MaskVideoSink(_PerObjectLosslessSink):
    """Per-object binary masks as lossless FFV1 gray8 (0 or 255) in Matroska."""

    suffix = "mask"

    def _plane(self, frame: FrameOutput, object_id: int) -> np.ndarray:
        return frame.mask_of(object_id).astype(np.uint8) * np.uint8(255)


class AlphaMatteSink(_PerObjectLosslessSink):
    """Per-object 8-bit soft alpha, round(sigmoid(logits) * 255) at source resolution, FFV1 gray8."""

    suffix = "alpha"

    def _plane(self, frame: FrameOutput, object_id: int) -> np.ndarray:
        if object_id not in frame.logits:
            return frame.mask_of(object_id).astype(np.uint8) * np.uint8(255)
        return logits_to_alpha(frame.logits[object_id])


def logits_to_alpha(logits: np.ndarray) -> np.ndarray:
    """round(sigmoid(logits) * 255) as uint8, computed stably for large |logits|."""
    values = np.asarray(logits, dtype=np.float64)
    alpha = 0.5 * (1.0 + np.tanh(0.5 * values))  # == sigmoid, without exp overflow
    return np.rint(alpha * 255.0).astype(np.uint8)


def object_colour(object_id: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in PALETTE[object_id % len(PALETTE)])


def _label_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_overlay(rgb: np.ndarray, masks: Mapping[int, np.ndarray], *, banner: Optional[str] = None) -> np.ndarray:
    """Blend each mask in its object's colour at 50% and label it with its object id."""
    canvas = np.array(rgb, dtype=np.uint8, copy=True)
    for object_id, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            colour = PALETTE[object_id % len(PALETTE)].astype(np.uint16)
            canvas[mask] = ((canvas[mask].astype(np.uint16) + colour) // 2).astype(np.uint8)
    labelled = [(oid, np.asarray(m, dtype=bool)) for oid, m in masks.items() if np.asarray(m).any()]
    if not labelled and banner is None:
        return canvas
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = _label_font(max(12, canvas.shape[0] // 24))
    for object_id, mask in labelled:
        rows, cols = np.nonzero(mask)
        anchor = (int(cols.mean()), int(rows.mean()))
        # White on a black outline stays legible on top of the object's own colour.
        draw.text(anchor, str(object_id), fill=(255, 255, 255), font=font, anchor="mm",
                  stroke_width=3, stroke_fill=object_colour(object_id))
    if banner:
        draw.text((8, 8), banner, fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(image)


class PreviewSink(Sink):
    """`preview.mp4`: H.264 at the source frame rate with coloured masks and object ids.

    yuv420p needs even dimensions, so odd-sized frames are padded by one edge pixel.
    `banner` (e.g. a smoke-run warning) is drawn on every frame.
    """

    def __init__(self, path: Path, fps: float, *, banner: Optional[str] = None, crf: int = 23):
        self.path = Path(path)
        self.name = str(self.path)
        self.fps = fps
        self.banner = banner
        self.crf = crf
        self._writer: Optional[_VideoWriter] = None

    def _open(self) -> None:
        _frame_rate(self.fps)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, frame: FrameOutput) -> None:
        if frame.rgb is None:
            raise ValueError("preview needs the frame's RGB pixels")
        record = frame.record
        masks = {obj.object_id: frame.mask_of(obj.object_id) for obj in record.objects}
        picture = draw_overlay(frame.rgb, masks, banner=self.banner)
        pad_h, pad_w = picture.shape[0] % 2, picture.shape[1] % 2
        if pad_h or pad_w:
            picture = np.pad(picture, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        if self._writer is None:
            options = {"crf": str(self.crf), "preset": "veryfast"}
            self._writer = _VideoWriter(
                self.path, "libx264", "yuv420p", picture.shape[1], picture.shape[0], self.fps, options
            )
        self._writer.write(picture, "rgb24")

    def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


def read_jsonl_records(path: Path) -> list[MaskletRecord]:
    """Read a masklets.jsonl back (tests, tools)."""
    with Path(path).open("rb") as handle:
        return [MaskletRecord.from_json_bytes(line) for line in handle if line.strip()]


__all__ = [
    "AlphaMatteSink", "FrameOutput", "JsonlSink", "MaskVideoSink", "PreviewSink", "Sink", "SinkError",
    "JsonlOutputs", "SegmentOutputs", "draw_overlay", "logits_to_alpha", "object_colour", "read_jsonl_records",
]


@dataclass(frozen=True)
class SegmentOutputs:
    """Builds one `masklet segment` input's sinks inside its publisher actor.

    It lives here, not in pipeline.segment, because unpickling it imports its module in the publisher
    process: pipeline.segment pulls in the engine and torch, which a publisher never needs."""

    out_dir: str
    soft_masks: bool
    preview: bool
    banner: str | None = None
    mask_videos: bool = True

    @property
    def needs_pixels(self) -> bool:
        """Whether a sink draws the frame; the scheduler sends pixels to the publisher only then
        (a factory without this attribute gets them)."""
        return self.preview

    def __call__(self, info: StreamInfo) -> list:
        out = Path(self.out_dir)
        fps = info.fps or 30.0
        sinks: list = [JsonlSink(out / "masklets.jsonl")]
        if self.mask_videos:
            sinks.append((AlphaMatteSink if self.soft_masks else MaskVideoSink)(out, fps))
        if self.preview:
            sinks.append(PreviewSink(out / "preview.mp4", fps, banner=self.banner))
        return sinks


@dataclass(frozen=True)
class JsonlOutputs:
    """Sink factory for `masklets.jsonl` alone, under `root/<stream_id>/` (benchmarks: no video encoding)."""

    root: str
    needs_pixels = False  # JSON records only

    def __call__(self, info: StreamInfo) -> list:
        return [JsonlSink(Path(self.root) / info.stream_id / "masklets.jsonl")]

