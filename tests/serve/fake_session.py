"""A LiveSession stand-in for fast API tests: same methods (checked against the LiveSessionAPI
protocol in tests/pipeline/test_fakes_follow_protocols.py), no model.

An object's mask is a disc of radius 12 around its points (or its box), on every later frame, so
tests can see exactly where the overlay must be coloured.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import numpy as np

from masklet.monitoring.stats import Stats
from masklet.pipeline.live import LiveConfig, LiveOutput, PromptRejected, StreamStatus
from masklet.actors.messages import MaskletRecord, ObjectMask, PromptMessage
from masklet.actors.rle import encode_mask, mask_bbox

DISC_RADIUS = 12


class FakeLiveSession:
    def __init__(self, max_streams: int = 16, on_output: Optional[Callable[[LiveOutput], None]] = None) -> None:
        self.max_streams = max_streams
        self.config = LiveConfig(max_streams=max_streams)
        self.on_output = on_output
        self.stats = Stats()
        self.prompts: list[PromptMessage] = []
        self.started = False
        self._streams: dict[str, dict] = {}
        self._lock = threading.Lock()

    def open_stream(self, stream_id: str, width: int, height: int, fps: Optional[float] = None, *,
                    source_type: str = "live", published_until: Optional[int] = None,
                    revision_floor: int = 0) -> None:
        with self._lock:
            if stream_id in self._streams:
                raise ValueError(f"stream {stream_id!r} is already open")
            if len(self._streams) >= self.max_streams:
                raise ValueError(f"max_streams ({self.max_streams}) reached; close a stream first")
            self._streams[stream_id] = {"size": (width, height), "objects": {}, "latest": None, "in": 0,
                                        "published": 0, "source_type": source_type}

    def close_stream(self, stream_id: str, timeout: float = 60.0) -> None:
        with self._lock:
            self._streams.pop(stream_id)

    def streams(self) -> list[str]:
        return list(self._streams)

    def queue_room(self, stream_id: str) -> int:
        return self.config.queue_capacity  # frames are handled at once: the queue is always empty

    def submit_frame(self, stream_id: str, frame_idx: int, pts: float, image: Any, token: Any = None, *,
                     lost_before: int = 0) -> None:
        rgb = image
        with self._lock:
            s = self._streams[stream_id]
            s["in"] += 1
            self.stats.inc("masklet_frames_in_total", source_type=s["source_type"])
            width, height = s["size"]
            masks = {oid: mask for oid, mask in s["objects"].items()}
            objects = []
            for oid, mask in sorted(masks.items()):
                objects.append(ObjectMask(object_id=oid, rle=encode_mask(mask), bbox=tuple(mask_bbox(mask)),
                                          area=int(mask.sum()), score=5.0, iou=0.9, present=bool(mask.any())))
            record = MaskletRecord(stream_id=stream_id, frame_idx=frame_idx, pts=pts, width=width, height=height,
                                   model="fake", objects=objects)
            output = LiveOutput(record, (token,), fetch_rgb=lambda: rgb)
            s["latest"] = output
            s["published"] += 1
            self.stats.inc("masklet_frames_published_total")
        if self.on_output is not None:
            self.on_output(output)

    def submit_prompt(self, msg: PromptMessage) -> None:
        with self._lock:
            s = self._streams.get(msg.stream_id)
            if s is None:
                raise PromptRejected("unknown_stream", f"no open stream {msg.stream_id!r}")
            self.prompts.append(msg)
            if msg.action == "remove":
                if msg.object_id not in s["objects"]:
                    raise PromptRejected("unknown_object", f"no object {msg.object_id}")
                del s["objects"][msg.object_id]
                return
            if msg.action == "refine" and msg.object_id not in s["objects"]:
                raise PromptRejected("unknown_object", f"no object {msg.object_id}")
            width, height = s["size"]
            mask = s["objects"].get(msg.object_id, np.zeros((height, width), bool)).copy()
            yy, xx = np.mgrid[0:height, 0:width]
            for (x, y), label in zip(msg.points, msg.labels):
                disc = (xx - x) ** 2 + (yy - y) ** 2 <= DISC_RADIUS ** 2
                mask = mask | disc if label == 1 else mask & ~disc
            if msg.box is not None:
                x0, y0, x1, y1 = msg.box
                mask[int(y0):int(y1), int(x0):int(x1)] = True
            s["objects"][msg.object_id] = mask

    def status(self, stream_id: str) -> StreamStatus:
        with self._lock:
            s = self._streams[stream_id]
            width, height = s["size"]
            return StreamStatus(stream_id, width, height, s["in"], s["published"], 0, 10.0, 0,
                                {oid: 5.0 for oid in s["objects"]})

    def latest(self, stream_id: str) -> Optional[LiveOutput]:
        with self._lock:
            return self._streams[stream_id]["latest"]

    def stats_snapshot(self):
        return self.stats.snapshot()

    def poll(self, timeout: float = 0.0) -> list:
        return []

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def shutdown(self) -> None:
        self.stop()
