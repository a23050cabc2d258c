"""The decoder actor: one per input stream, hands out decoded frames in order, in chunks."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from masklet.actors.payloads import InputError, actor_pid, limit_threads
from masklet.monitoring.stats import Stats
from masklet.actors.sources import SourceError


@dataclass(frozen=True)
class SourceInfo:
    name: str
    width: int
    height: int
    fps: float | None
    frame_count: int | None  # an estimate from the container; None when unknown or live
    is_live: bool


class DecoderActor:
    """Wraps a FrameSource opener (`pipeline.sources.open_source` bound to its input).

    The source is opened in `open()` rather than the constructor so a bad input comes back as a
    failed call carrying the source's one-line reason, not as an actor that never started.
    A `SourceError` travels as itself (it pickles, so Ray rebuilds it); any other exception from
    the opener or the decoder is flattened into an `InputError` with the same one-line treatment.
    """

    def __init__(self, opener: Callable[[], Any], num_threads: int | None = 1) -> None:
        limit_threads(num_threads)
        self.opener = opener
        self.source = None
        self.frames = None
        self.stats = Stats()

    def open(self) -> SourceInfo:
        try:
            self.source = self.opener()
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - becomes the input's one error line
            raise InputError(_one_line(exc)) from None
        self.frames = iter(self.source.frames())
        return SourceInfo(str(getattr(self.source, "name", "input")), int(self.source.width), int(self.source.height),
                          getattr(self.source, "fps", None), getattr(self.source, "frame_count", None),
                          bool(getattr(self.source, "is_live", False)))

    def read(self, max_frames: int) -> list:
        """Up to `max_frames` next frames; an empty list means the input has ended."""
        out = []
        while len(out) < max_frames:
            start = time.perf_counter()
            try:
                frame = next(self.frames, None)
            except SourceError:
                self.close()
                raise
            except Exception as exc:  # noqa: BLE001
                self.close()
                raise InputError(_one_line(exc)) from None
            if frame is None:
                self.close()
                break
            self.stats.observe("masklet_stage_latency_seconds", time.perf_counter() - start, stage="decode")
            out.append(frame)
        return out

    def close(self) -> None:
        if self.source is not None and hasattr(self.source, "close"):
            self.source.close()
        self.frames = iter(())

    def stats_snapshot(self):
        return self.stats.snapshot()

    def pid(self) -> int:
        return actor_pid()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
