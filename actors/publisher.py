"""The publisher actor: one per stream; joins a frame's objects into a masklet/v1 record and writes sinks.

Sinks follow pipeline.sinks: `open()`, `write(FrameOutput)` and `close()` return a SinkError or None.
A failing sink is reported in the call's `PublishAck` (the engine turns it into an event) and is
not written again; the other sinks and the stream go on.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from masklet.actors.payloads import FrameMeta, StreamInfo, TrackedMask, actor_pid, limit_threads
from masklet.monitoring.stats import Stats
from masklet.actors.messages import CocoRle, MaskletRecord, ObjectMask
from masklet.actors.rle import encode_masks
from masklet.actors.sinks import FrameOutput


@dataclass(frozen=True)
class PublishAck:
    stream_id: str
    frame_idx: int
    accepted: bool                      # every sink still enabled took the frame
    sink_errors: tuple[str, ...] = ()   # first failure of each sink, once
    num_objects: int = 0


def build_record(meta: FrameMeta, masks: Sequence[TrackedMask], model_name: str) -> MaskletRecord:
    masks = sorted(masks, key=lambda m: m.object_id)
    rles = encode_masks(np.stack([m.mask for m in masks])) if masks else []
    objects = []
    for m, rle in zip(masks, rles):
        ys, xs = np.nonzero(m.mask)
        bbox = (0, 0, 0, 0) if xs.size == 0 else (int(xs.min()), int(ys.min()),
                                                   int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        objects.append(ObjectMask(object_id=m.object_id, rle=CocoRle(size=tuple(rle["size"]), counts=rle["counts"]),
                                  bbox=bbox, area=int(xs.size), score=_finite(m.score), iou=_finite(m.iou),
                                  present=m.present))
    return MaskletRecord(stream_id=meta.stream_id, frame_idx=meta.frame_idx, pts=_finite(meta.pts),
                         width=meta.width, height=meta.height, model=model_name,
                         dropped_frames_since_last=meta.dropped_since_last, objects=objects)


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else (0.0 if math.isnan(value) else math.copysign(1e30, value))


class PublisherActor:
    """`sink_factory(info)` builds this stream's sinks inside the actor (they hold files/encoders)."""

    def __init__(self, info: StreamInfo, sink_factory: Callable[[StreamInfo], list[Any]],
                 num_threads: int | None = 1) -> None:
        limit_threads(num_threads)
        self.info = info
        self.sink_factory = sink_factory
        self.sinks: list[Any] = []
        self.failed: set[int] = set()
        self.stats = Stats()

    def open(self) -> tuple[str, ...]:
        try:
            self.sinks = list(self.sink_factory(self.info))
        except Exception as exc:  # noqa: BLE001 - reported, the engine decides
            return (f"cannot set up outputs: {exc}",)
        errors = [str(e) for e in (self._call(sink, "open") for sink in self.sinks) if e is not None]
        return tuple(errors)

    def publish(self, meta: FrameMeta, rgb: np.ndarray | None, *masks: TrackedMask) -> PublishAck:
        start = time.perf_counter()
        masks = tuple(sorted(masks, key=lambda m: m.object_id))
        record = build_record(meta, masks, self.info.model_name)
        frame = FrameOutput(record, rgb, {m.object_id: m.mask for m in masks},
                            {m.object_id: m.logits for m in masks if m.logits is not None})
        errors = []
        for i, sink in enumerate(self.sinks):
            if i in self.failed:
                continue
            error = self._call(sink, "write", frame)
            if error is not None:
                self.failed.add(i)
                errors.append(str(error))
        accepted = not self.failed
        if accepted:
            self.stats.inc("masklet_frames_published_total")
        else:
            self.stats.inc("masklet_frames_dropped_total", reason="sink_error")
        self.stats.observe("masklet_stage_latency_seconds", time.perf_counter() - start, stage="publish")
        return PublishAck(meta.stream_id, meta.frame_idx, accepted, tuple(errors), len(masks))

    def close(self) -> tuple[str, ...]:
        errors = [str(e) for i, sink in enumerate(self.sinks) if i not in self.failed
                  for e in [self._call(sink, "close")] if e is not None]
        self.sinks = []
        return tuple(errors)

    @staticmethod
    def _call(sink: Any, method: str, *args: Any) -> Any:
        try:
            return getattr(sink, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a sink failure is an event, never a crash
            return f"{getattr(sink, 'name', type(sink).__name__)}: {type(exc).__name__}: {exc}"

    def stats_snapshot(self):
        return self.stats.snapshot()

    def pid(self) -> int:
        return actor_pid()
