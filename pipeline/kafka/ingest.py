"""`masklet ingest`: decode a file, folder, HTTP or RTSP source and publish frame/v1 records.

Key = stream id (one partition per stream, so a stream stays in order); value = JPEG; headers =
frame/v1 plus width/height. `frame_idx` and `pts` keep increasing across reconnects, so a
consumer never sees a stream restart at 0 in the middle.

Network sources reconnect with exponential backoff, at most `max_reconnects` times in a row
(the count resets once a frame arrives). Then ingest gives up explicitly: the report says so
and the CLI exits non-zero. Live protocols (rtsp, rtmp, srt, udp) treat end-of-stream as a
disconnect; files and HTTP downloads end normally at EOF.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from masklet.pipeline.config import DEFAULT_MAX_PIXELS, KafkaSettings
from masklet.pipeline.kafka.client import producer_kwargs
from masklet.pipeline.kafka.codec import JPEG, encode_jpeg, frame_headers
from masklet.pipeline.kafka.producer import DeliveryReport, ProducerGaveUp, RecoveringProducer
from masklet.actors.sources import LIVE_SCHEMES, NETWORK_SCHEMES, DecodedFrame, SourceError, open_source

log = logging.getLogger(__name__)


def source_type_of(uri: str) -> str:
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("rtsp", "rtsps"):
        return "rtsp"
    if scheme in ("http", "https"):
        return "http"
    return scheme if scheme in NETWORK_SCHEMES else "file"


@dataclass
class IngestReport:
    stream_id: str
    source: str
    frames_sent: int = 0
    bytes_sent: int = 0
    reconnects: int = 0
    gave_up: bool = False
    give_up_reason: str = ""
    elapsed_s: float = 0.0
    delivery: DeliveryReport = field(default_factory=DeliveryReport)

    @property
    def frames_per_s(self) -> float:
        return self.frames_sent / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.elapsed_s if self.elapsed_s else 0.0

    def summary(self) -> str:
        state = f"GAVE UP ({self.give_up_reason})" if self.gave_up else "done"
        return (f"{state}: stream={self.stream_id} frames={self.frames_sent} "
                f"bytes={self.bytes_sent} ({self.frames_per_s:.1f} frames/s, {self.mb_per_s:.1f} MB/s) "
                f"reconnects={self.reconnects}; delivery: {self.delivery.summary()}")


@dataclass
class ReconnectPolicy:
    max_reconnects: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.initial_backoff_s * 2 ** (attempt - 1), self.max_backoff_s)


class _Pacer:
    """Sleeps so that frames leave at their pts rate (for --realtime on files)."""

    def __init__(self, sleep: Callable[[float], None]) -> None:
        self._sleep = sleep
        self._anchor: Optional[tuple[float, float]] = None

    def wait(self, pts: float) -> None:
        now = time.monotonic()
        if self._anchor is None:
            self._anchor = (now, pts)
            return
        wall0, pts0 = self._anchor
        delay = wall0 + (pts - pts0) - now
        if delay > 0:
            self._sleep(delay)


def _frames_with_reconnect(uri: str, report: IngestReport, policy: ReconnectPolicy, *, max_frames: Optional[int],
                           max_pixels: int, open_fn: Callable[..., Any], sleep: Callable[[float], None],
                           stats: Any) -> Iterator[tuple[int, float, DecodedFrame]]:
    """Yield (frame_idx, pts, frame), renumbered to stay monotonic across reconnects."""
    source_type = source_type_of(uri)
    reconnectable = source_type != "file"
    live = uri.split("://", 1)[0].lower() in LIVE_SCHEMES if "://" in uri else False
    next_idx, last_pts, step = 0, None, 1 / 30
    failures_in_a_row = 0
    while max_frames is None or next_idx < max_frames:
        remaining = None if max_frames is None else max_frames - next_idx
        pts_offset = None
        problem = ""
        try:
            with open_fn(uri, max_pixels=max_pixels, max_frames=remaining) as source:
                step = 1 / source.fps if source.fps else step
                for frame in source.frames():
                    failures_in_a_row = 0
                    if pts_offset is None:
                        pts_offset = 0.0 if last_pts is None else last_pts + step - frame.pts
                    last_pts = frame.pts + pts_offset
                    yield next_idx, last_pts, frame
                    next_idx += 1
                    if max_frames is not None and next_idx >= max_frames:
                        return  # stop before pulling (and maybe failing on) a frame we do not need
            if not live or (max_frames is not None and next_idx >= max_frames):
                return
            problem = "end of live stream"
        except SourceError as exc:
            if not reconnectable:
                raise
            problem = exc.reason
        failures_in_a_row += 1
        if failures_in_a_row > policy.max_reconnects:
            report.gave_up = True
            report.give_up_reason = f"{policy.max_reconnects} reconnects failed; last error: {problem}"
            log.error("giving up on %s: %s", uri, report.give_up_reason)
            return
        delay = policy.delay(failures_in_a_row)
        log.warning("%s: %s; reconnecting in %.1fs (attempt %d of %d)",
                    uri, problem, delay, failures_in_a_row, policy.max_reconnects)
        report.reconnects += 1
        if stats is not None:
            stats.inc("masklet_reconnects_total", source_type=source_type)
        sleep(delay)


def ingest(
    source: str,
    stream_id: str,
    settings: KafkaSettings,
    *,
    realtime: bool = False,
    max_frames: Optional[int] = None,
    jpeg_quality: int = 90,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reconnect: ReconnectPolicy = ReconnectPolicy(),
    producer: Optional[RecoveringProducer] = None,
    stats: Any = None,
    open_fn: Callable[..., Any] = open_source,
    sleep: Callable[[float], None] = time.sleep,
    flush_timeout_s: float = 60.0,
) -> IngestReport:
    """Publish `source` to the frames topic; returns a report (raises SourceError for unreadable files)."""
    report = IngestReport(stream_id=stream_id, source=str(source))
    own_producer = producer is None
    producer = producer or RecoveringProducer(producer_kwargs(settings), stats=stats)
    topic, key = settings.topics.frames, stream_id.encode("utf-8")
    pacer = _Pacer(sleep) if realtime else None
    source_type = source_type_of(str(source))
    started = time.monotonic()
    try:
        for frame_idx, pts, frame in _frames_with_reconnect(
                str(source), report, reconnect, max_frames=max_frames, max_pixels=max_pixels,
                open_fn=open_fn, sleep=sleep, stats=stats):
            if pacer is not None:
                pacer.wait(pts)
            value = encode_jpeg(frame.rgb, jpeg_quality)
            producer.send(topic, value=value, key=key,
                          headers=frame_headers(frame_idx, pts, frame.width, frame.height, JPEG))
            report.frames_sent += 1
            report.bytes_sent += len(value)
            if stats is not None:
                stats.inc("masklet_frames_in_total", source_type=source_type)
        report.delivery = producer.flush(flush_timeout_s)
    except ProducerGaveUp as exc:
        report.gave_up = True
        report.give_up_reason = str(exc)
        report.delivery = exc.report
    finally:
        if own_producer:
            try:
                report.delivery = producer.close(timeout=5.0)
            except ProducerGaveUp as exc:
                report.delivery = exc.report
        report.elapsed_s = time.monotonic() - started
    return report
