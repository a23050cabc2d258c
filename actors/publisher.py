"""Publisher actors: one process publishes for several streams, files and live streams alike.

A frame's objects arrive as `ObjectResult`s (low-resolution logits and scores). The publisher does
everything at video resolution: upsampling and thresholding, COCO RLE, bbox and area
(`actors.masks`: only the rows and columns an object can cover are computed, bit-identical to
`F.interpolate(...) > 0`), soft mattes when asked, and the sinks. For live streams the record also
comes back to the caller (`PublishAck.record`), ready for Kafka or the API.

Sinks follow actors.sinks: `open()`, `write(FrameOutput)` and `close()` return a SinkError or
None. A failing sink is reported in the call's `PublishAck` (the scheduler turns it into an event)
and is not written again; the other sinks and the stream go on.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from masklet.actors.masks import MaskSummary, summarize_mask, upsample_logits
from masklet.actors.messages import CocoRle, MaskletRecord, ObjectMask
from masklet.actors.payloads import ArgLayout, FrameMeta, ObjectResult, Pick, StreamInfo, picked
from masklet.actors.runtime import actor_pid, limit_threads, node_id
from masklet.actors.sinks import FrameOutput
from masklet.monitoring.stats import Stats


@dataclass(frozen=True)
class PublishAck:
    stream_id: str
    frame_idx: int
    accepted: bool                      # every sink still enabled took the frame
    sink_errors: tuple[str, ...] = ()   # first failure of each sink, once
    num_objects: int = 0
    record: Optional[MaskletRecord] = None  # live streams: the masklet/v1 record, for Kafka or the API
    revision: int = 0


def build_record(meta: FrameMeta, results: Sequence[ObjectResult], model_name: str,
                 summaries: Optional[Sequence[MaskSummary]] = None, kernel: Optional[str] = None) -> MaskletRecord:
    """The masklet/v1 record of one frame from its objects' low-resolution results."""
    results = sorted(results, key=lambda r: r.object_id)
    size = (meta.height, meta.width)
    if summaries is None:
        summaries = [summarize_mask(r.low_res_logits, size, kernel) for r in results]
    objects = [ObjectMask(object_id=r.object_id, rle=CocoRle(size=s.size, counts=s.counts), bbox=s.bbox,
                          area=s.area, score=_finite(r.score), iou=_finite(r.iou), present=r.present)
               for r, s in zip(results, summaries)]
    return MaskletRecord(stream_id=meta.stream_id, frame_idx=meta.frame_idx, pts=_finite(meta.pts),
                         width=meta.width, height=meta.height, model=model_name,
                         dropped_frames_since_last=meta.dropped_since_last,
                         lost_frames_since_last=meta.lost_since_last, revision=meta.revision, objects=objects)


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else (0.0 if math.isnan(value) else math.copysign(1e30, value))


class _Stream:
    def __init__(self, info: StreamInfo, sinks: list[Any]) -> None:
        self.info = info
        self.sinks = sinks
        self.failed: set[int] = set()


class PublisherActor:
    def __init__(self, num_threads: int | None = 1) -> None:
        limit_threads(num_threads)
        self.streams: dict[str, _Stream] = {}
        self.stats = Stats()

    def open(self, info: StreamInfo, sink_factory: Optional[Callable[[StreamInfo], list[Any]]] = None) -> tuple[str, ...]:
        """`sink_factory(info)` builds this stream's sinks here (they hold files and video encoders)."""
        try:
            sinks = list(sink_factory(info)) if sink_factory is not None else []
        except Exception as exc:  # noqa: BLE001 - reported, the scheduler decides
            return (f"cannot set up outputs: {exc}",)
        stream = self.streams[info.stream_id] = _Stream(info, sinks)
        errors = []
        for i, sink in enumerate(sinks):
            error = _call(sink, "open")
            if error is not None:
                stream.failed.add(i)
                errors.append(str(error))
        return tuple(errors)

    def publish_frames(self, frames: tuple[tuple[FrameMeta, Optional[Pick], tuple[Pick, ...]], ...],
                       *values: Any) -> tuple[PublishAck, ...]:
        """Publish several frames, in order, in one call: the frames a round completed. Each is
        (meta, rgb pick or None, result picks) over `values` (`publish_frames_args` lays them out); a
        tracker call's pack, or a decoder read's, is passed once for all the frames it holds values
        of. One call per frame cost the driver and raylet more than the publishing itself (measured:
        1 of 1.85 actor calls per frame were publishes, 2 streams x 8 objects, null model)."""
        return tuple(self._publish(meta, None if rgb is None else picked(rgb, values),
                                   tuple(picked(p, values) for p in picks))
                     for meta, rgb, picks in frames)

    def _publish(self, meta: FrameMeta, rgb: Optional[np.ndarray], results: tuple) -> PublishAck:
        start = time.perf_counter()
        stream = self.streams.get(meta.stream_id)
        if stream is None:
            raise KeyError(f"stream {meta.stream_id!r} is not open on this publisher")
        results = tuple(sorted((r for r in results if r is not None), key=lambda r: r.object_id))
        size = (meta.height, meta.width)
        kernel = stream.info.mask_kernel or None
        summaries = [summarize_mask(r.low_res_logits, size, kernel) for r in results]
        record = build_record(meta, results, stream.info.model_name, summaries)
        errors = []
        if stream.sinks:
            # Masks are decoded from the record by the sinks that draw pixels (FrameOutput.mask_of);
            # a JSONL sink never pays for them.
            logits = ({r.object_id: upsample_logits(r.low_res_logits, size, kernel) for r in results}
                      if stream.info.soft_masks else {})
            frame = FrameOutput(record, rgb, {}, logits)
            for i, sink in enumerate(stream.sinks):
                if i in stream.failed:
                    continue
                error = _call(sink, "write", frame)
                if error is not None:
                    stream.failed.add(i)
                    errors.append(str(error))
        accepted = not stream.failed
        if meta.republished:
            self.stats.inc("masklet_revisions_published_total")
        elif accepted:
            self.stats.inc("masklet_frames_published_total")
        else:
            self.stats.inc("masklet_frames_dropped_total", reason="sink_error")
        self.stats.observe("masklet_stage_latency_seconds", time.perf_counter() - start, stage="publish")
        return PublishAck(meta.stream_id, meta.frame_idx, accepted, tuple(errors), len(results),
                          record if stream.info.return_records else None, meta.revision)

    def close(self, stream_id: str) -> tuple[str, ...]:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return ()
        return tuple(str(e) for i, sink in enumerate(stream.sinks) if i not in stream.failed
                     for e in [_call(sink, "close")] if e is not None)

    def report(self) -> dict:
        return {"streams": sorted(self.streams), "node": node_id(), "pid": actor_pid()}

    def stats_snapshot(self):
        return self.stats.snapshot()

    def pid(self) -> int:
        return actor_pid()


def _call(sink: Any, method: str, *args: Any) -> Any:
    try:
        return getattr(sink, method)(*args)
    except Exception as exc:  # noqa: BLE001 - a sink failure is an event, never a crash
        return f"{getattr(sink, 'name', type(sink).__name__)}: {type(exc).__name__}: {exc}"


def publish_frames_args(frames: Sequence[tuple[FrameMeta, Any, Sequence[Any]]]) -> tuple[tuple, list[Any]]:
    """(frames, values) for `PublisherActor.publish_frames` from (meta, rgb or None, results) per frame."""
    layout = ArgLayout()
    laid = tuple((meta, None if rgb is None else layout.pick(rgb), layout.picks(results))
                 for meta, rgb, results in frames)
    return laid, layout.values
