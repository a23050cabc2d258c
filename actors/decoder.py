"""Decoder actors: one process decodes for several streams (files, URLs, image folders, live JPEGs).

Frames never pass through the driver. `read` returns two values: a small tuple of
`(frame_idx, pts)` the scheduler reads, then the frames' pixels packed in one tuple (Ray stores it
once; the encoder and the publisher read each frame by reference, as `PackedResult(pack, i)`). One
object per read rather than one per frame: each object costs the raylet, this process and every
reader work of their own. Objects returned from a call are owned by the caller, so they outlive
this actor.

A source is opened in `open()` rather than in a constructor so a bad input comes back as a failed
call carrying the source's one-line reason. A `SourceError` travels as itself (it pickles, so Ray
rebuilds it); any other exception from the opener or the decoder becomes an `InputError` with the
same one-line treatment.

`decode(*images)` turns compressed live frames (JPEG/PNG bytes from Kafka or the API) into pixels,
so that work never runs in the driver or under the live session's lock; an image that does not
decode comes back as a `FrameFailure` with the reason, and the others of the call are unaffected.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from masklet.actors.payloads import EncodedImage, FrameFailure, InputError, one_line
from masklet.actors.runtime import actor_pid, in_actor_process, keep_freed_memory, limit_threads, node_id
from masklet.actors.sources import DEFAULT_MAX_PIXELS, SourceError, decode_image_bytes, set_decode_threads
from masklet.monitoring.stats import Stats


@dataclass(frozen=True)
class SourceInfo:
    name: str
    width: int
    height: int
    fps: float | None
    frame_count: int | None  # an estimate from the container; None when unknown or live
    is_live: bool


class _Open:
    def __init__(self, source: Any) -> None:
        self.source = source
        self.frames = iter(source.frames())


class DecoderActor:
    def __init__(self, num_threads: int | None = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        limit_threads(num_threads)
        if in_actor_process():  # not in a caller's process (in-process backend): its heap, its policy
            keep_freed_memory()  # every frame is a fresh frame-sized array, freed once stored
        set_decode_threads(num_threads)
        self.max_pixels = max_pixels
        self.streams: dict[str, _Open] = {}
        self.stats = Stats()

    # -- files and network sources ------------------------------------------------------------

    def open(self, stream_id: str, opener: Callable[[], Any]) -> SourceInfo:
        try:
            source = opener()
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - becomes the input's one error line
            raise InputError(one_line(exc)) from None
        self.streams[stream_id] = _Open(source)
        return SourceInfo(str(getattr(source, "name", "input")), int(source.width), int(source.height),
                          getattr(source, "fps", None), getattr(source, "frame_count", None),
                          bool(getattr(source, "is_live", False)))

    def read(self, stream_id: str, max_frames: int) -> tuple[tuple, tuple]:
        """(((frame_idx, pts), ...), (rgb, ...)): up to `max_frames` frames; none means the input has ended."""
        opened = self.streams.get(stream_id)
        metas: list[tuple[int, float]] = []
        pixels: list[Any] = []
        while opened is not None and len(metas) < max_frames:
            start = time.perf_counter()
            try:
                frame = next(opened.frames, None)
            except SourceError:
                self.close(stream_id)
                raise
            except Exception as exc:  # noqa: BLE001
                self.close(stream_id)
                raise InputError(one_line(exc)) from None
            if frame is None:
                self.close(stream_id)
                break
            self.stats.observe("masklet_stage_latency_seconds", time.perf_counter() - start, stage="decode")
            metas.append((int(frame.frame_idx), float(frame.pts)))
            pixels.append(frame.rgb)
        return tuple(metas), tuple(pixels)

    def close(self, stream_id: str) -> None:
        opened = self.streams.pop(stream_id, None)
        if opened is not None and hasattr(opened.source, "close"):
            try:
                opened.source.close()
            except Exception:  # noqa: BLE001 - closing a broken input must not fail the run
                pass

    # -- live compressed frames -----------------------------------------------------------------

    def decode(self, *images: EncodedImage) -> tuple:
        """(statuses, rgb_or_failure...): one status (None or the reason) and one value per image."""
        statuses, values = [], []
        for image in images:
            start = time.perf_counter()
            try:
                rgb = decode_image_bytes(image.data, image.content_type, self.max_pixels)
                if rgb.shape[:2] != (image.height, image.width):
                    raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, its header said "
                                     f"{image.width}x{image.height}")
                values.append(rgb)
                statuses.append(None)
            except Exception as exc:  # noqa: BLE001 - one bad frame is that frame's problem
                reason = one_line(exc)
                values.append(FrameFailure(reason))
                statuses.append(reason)
            self.stats.observe("masklet_stage_latency_seconds", time.perf_counter() - start, stage="decode")
        return (tuple(statuses), *values)

    # -- housekeeping -------------------------------------------------------------------------

    def report(self) -> dict:
        return {"streams": sorted(self.streams), "node": node_id(), "pid": actor_pid()}

    def stats_snapshot(self):
        return self.stats.snapshot()

    def pid(self) -> int:
        return actor_pid()
