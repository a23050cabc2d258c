"""Threads that feed a LiveSession: one per stream, from a file/URL/RTSP source or a Kafka stream id.

Where the session runs on Ray, a file/URL/RTSP source is read and decoded in a SourceReader actor
(`actor_source_frames`, actors/source_reader.py) and its frames reach the session as references into
the object store: the API replica's core stays with HTTP. In-process, the feeder thread decodes.

A feeder opens its LiveSession stream when the first frame arrives (only then are the width,
height and frame rate known), submits frames without ever blocking (the session drops the
oldest frame when it falls behind), and closes nothing itself: the stream, with its latest
frame and objects, stays inspectable until the API deletes it.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from masklet.actors.payloads import EncodedImage, StoredFrame
from masklet.monitoring.stats import Stats
from masklet.pipeline.config import DEFAULT_MAX_PIXELS, KafkaSettings

log = logging.getLogger(__name__)


def source_type_of(uri: str) -> str:
    """The `source_type` label of a source: file, http or rtsp (as `masklet ingest` counts them)."""
    from masklet.pipeline.kafka.ingest import source_type_of as ingest_source_type

    return ingest_source_type(uri)


# How long one blocking read (a Kafka poll) may take before the stop flag is checked again.
POLL_INTERVAL_S = 0.25


@dataclass
class FeederState:
    state: str = "starting"  # starting -> running -> finished | failed
    error: Optional[str] = None
    frames_fed: int = 0
    size: Optional[tuple[int, int]] = None  # (width, height) once the first frame arrived
    # Kept when the stream ends and leaves the LiveSession, so it stays inspectable without holding
    # a session slot: the session's last StreamStatus and LiveOutput of the stream.
    last_status: Any = None
    last_output: Any = None


@dataclass(frozen=True)
class FeedFrame:
    frame_idx: int
    pts: float
    # uint8 [H, W, 3] pixels, an EncodedImage a decoder actor decodes, or a StoredFrame (a source reader's)
    rgb: Any = field(repr=False)
    fps: Optional[float] = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        if isinstance(self.rgb, (EncodedImage, StoredFrame)):
            return self.rgb.height, self.rgb.width
        return tuple(self.rgb.shape[:2])


_FEEDER_SERIALS = itertools.count()


class Feeder:
    """Runs `frames()` on a daemon thread and hands each frame to `session.submit_frame`."""

    def __init__(self, session: Any, stream_id: str, describe: str,
                 frames: Callable[[threading.Event], Iterator[FeedFrame]], *, source_type: str = "live",
                 on_end: Optional[Callable[["Feeder"], None]] = None) -> None:
        self.session = session
        self.on_end = on_end  # called once the stream finished or failed (not when stopped)
        self.source_type = source_type
        self.stream_id = stream_id
        self.describe = describe
        self.status = FeederState()
        self.serial = next(_FEEDER_SERIALS)  # tells a stream created again under the same id from the old one
        self._frames = frames
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"feeder-{stream_id}", daemon=True)

    def start(self) -> "Feeder":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            # closing(): an early return or a refused frame ends the source now (a reader actor is
            # killed then), not whenever the generator is collected.
            with contextlib.closing(self._frames(self._stop)) as frames:
                self._feed(frames)
            if not self._stop.is_set():
                self.status.state = "finished"
        except Exception as exc:  # a feeder failure ends its stream, never the server
            log.warning("stream %s (%s) failed: %s", self.stream_id, self.describe, exc)
            self.status.state = "failed"
            self.status.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if self.on_end is not None and self.status.state in ("finished", "failed"):
            try:
                self.on_end(self)
            except Exception:  # noqa: BLE001 - bookkeeping must not turn into a thread traceback
                log.exception("stream %s: end-of-stream hook failed", self.stream_id)

    def _feed(self, frames: Iterator[FeedFrame]) -> None:
        for frame in frames:
            if self._stop.is_set():
                return
            if self.status.size is None:
                height, width = frame.size
                self.session.open_stream(self.stream_id, width, height, fps=frame.fps, source_type=self.source_type)
                self.status.size = (width, height)
                self.status.state = "running"
            self.session.submit_frame(self.stream_id, frame.frame_idx, frame.pts, frame.rgb)
            self.status.frames_fed += 1


def source_frames(uri: str, *, realtime: bool, loop: bool, max_frames: Optional[int],
                  max_pixels: int = DEFAULT_MAX_PIXELS, stats: Optional[Stats] = None,
                  sleep: Callable[[float], None] = time.sleep) -> Callable[[threading.Event], Iterator[FeedFrame]]:
    """Frames of a file, folder or http(s)/rtsp URL; network sources reconnect (counted in stats)."""
    # The ingest command already knows how to reconnect and renumber frames monotonically.
    from masklet.pipeline.kafka.ingest import IngestReport, ReconnectPolicy, _frames_with_reconnect
    from masklet.actors.sources import open_source

    def frames(stop: threading.Event) -> Iterator[FeedFrame]:
        next_idx, pts_offset, fed = 0, 0.0, 0
        while not stop.is_set():
            report = IngestReport(stream_id="", source=uri)
            remaining = None if max_frames is None else max_frames - fed
            last_pts, start_wall, first_pts, step = None, time.monotonic(), None, 1 / 30
            passed = _frames_with_reconnect(uri, report, ReconnectPolicy(), max_frames=remaining,
                                            max_pixels=max_pixels, open_fn=open_source, sleep=sleep, stats=stats)
            for _, pts, decoded in passed:
                if stop.is_set():
                    return
                if realtime:  # pace like a camera so DROP_OLDEST and fps behave as live
                    first_pts = pts if first_pts is None else first_pts
                    delay = start_wall + (pts - first_pts) - time.monotonic()
                    if delay > 0:
                        stop.wait(min(delay, 1.0))
                if last_pts is not None and pts > last_pts:
                    step = pts - last_pts
                last_pts = pts
                yield FeedFrame(next_idx, pts_offset + pts, decoded.rgb, fps=round(1 / step, 3) if step else None)
                next_idx += 1
                fed += 1
            if report.gave_up:
                raise RuntimeError(f"{uri}: {report.give_up_reason}")
            if not loop or next_idx == 0 or (max_frames is not None and fed >= max_frames):
                return
            pts_offset += (last_pts or 0.0) + step  # the next pass continues the timeline

    return frames


class ReaderPool:
    """The SourceReader actor (actors/source_reader.py) that reads the sources of this process's
    streams: one actor for all of them, spawned on first use and again once it has died."""

    def __init__(self, backend: Any, max_streams: int) -> None:
        self.backend = backend
        # Each stream keeps one call waiting in the actor (plus an open or close now and then).
        self.max_concurrency = 2 * max(1, max_streams) + 8
        self._reader: Any = None
        self._generation = itertools.count()
        self._lock = threading.Lock()

    def get(self) -> Any:
        from masklet.actors.backend import ActorOptions
        from masklet.actors.source_reader import SourceReader

        with self._lock:
            if self._reader is None:
                # same_node: a local file must be on the disk the reader opens.
                self._reader = self.backend.spawn(f"source-reader-{next(self._generation)}", SourceReader,
                                                  options=ActorOptions(same_node=True,
                                                                       max_concurrency=self.max_concurrency))
            return self._reader

    def lost(self, reader: Any) -> None:
        """`reader` died: the next stream gets a fresh one."""
        with self._lock:
            if self._reader is reader:
                self._reader = None
        self.backend.kill(reader)

    def shutdown(self) -> None:
        with self._lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            self.backend.kill(reader)


def actor_source_frames(pool: ReaderPool, key: str, make_frames: Callable[..., Any],
                        stats: Optional[Stats] = None) -> Callable[[threading.Event], Iterator[FeedFrame]]:
    """The frames of `make_frames` (a `source_frames` partial), read and decoded in the pool's reader
    actor under `key` (unique per stream and creation), not in this process: each frame reaches the
    session as a StoredFrame.

    One call is kept waiting for the next frame (the reader's threads may answer calls in any order).
    The reader's counters (reconnects) are added to `stats` with every answer, also while the source
    is reconnecting and when it ends or fails. A failing source ends the stream with its own one-line
    reason; a reader that dies ends it with "source reader died: ...". Closing the generator (the
    feeder stops, or the session refused the stream) closes the source in the reader."""
    from masklet.actors.backend import ActorDiedError

    backend = pool.backend

    def frames(stop: threading.Event) -> Iterator[FeedFrame]:
        reader = pool.get()
        try:
            backend.get(backend.call(reader, "open", key, make_frames))
            call = backend.call(reader, "next_frame", key, num_returns=2)
            while not stop.is_set():
                meta_future, pixels = call
                if not backend.wait([meta_future], POLL_INTERVAL_S)[0]:
                    continue  # look at `stop` again
                meta = backend.get(meta_future)
                for counter, amount, labels in meta["counters"]:
                    if stats is not None:
                        stats.inc(counter, amount, **labels)
                if meta["kind"] == "end":
                    return
                if meta["kind"] == "error":
                    raise RuntimeError(meta["reason"])
                call = backend.call(reader, "next_frame", key, num_returns=2)
                if meta["kind"] == "frame":
                    yield FeedFrame(meta["frame_idx"], meta["pts"],
                                    StoredFrame(pixels, meta["height"], meta["width"]), fps=meta["fps"])
        except ActorDiedError as exc:
            pool.lost(reader)
            raise RuntimeError(f"source reader died: {exc}") from None
        finally:
            backend.call(reader, "close", key)  # not waited for; a dead reader's call just fails

    return frames


def kafka_frames(settings: KafkaSettings, kafka_stream: str, *, max_frames: Optional[int],
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Callable[[threading.Event], Iterator[FeedFrame]]:
    """Frames published under key `kafka_stream` on the frames topic, from now on.

    A group-less consumer assigned every partition: it must not join `masklet run`'s consumer
    group (that would steal partitions from it), and a live view starts at the end of the topic.
    """

    def frames(stop: threading.Event) -> Iterator[FeedFrame]:
        from kafka import KafkaConsumer, TopicPartition

        from masklet.pipeline.kafka.client import consumer_kwargs, topic_partitions
        from masklet.pipeline.kafka.codec import inspect_frame
        from masklet.pipeline.kafka.deadletter import Rejected

        consumer = KafkaConsumer(**consumer_kwargs(settings, group=False))
        try:
            topic = settings.topics.frames
            partitions = topic_partitions(consumer, topic, timeout_s=5.0)
            if not partitions:
                raise RuntimeError(f"Kafka topic {topic!r} does not exist on {settings.bootstrap_servers}")
            consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
            consumer.seek_to_end()
            wanted, fed = kafka_stream.encode("utf-8"), 0
            while not stop.is_set() and (max_frames is None or fed < max_frames):
                batches = consumer.poll(timeout_ms=int(POLL_INTERVAL_S * 1000), max_records=64)
                for records in batches.values():
                    for record in records:
                        if record.key != wanted:
                            continue
                        try:
                            # Header checks only: the JPEG is decoded in a decoder actor, not in this replica.
                            _, meta, image = inspect_frame(record.key, record.value, record.headers, max_pixels)
                        except Rejected as exc:  # `masklet run` dead-letters these; the viewer skips them
                            log.info("skipping frame of %s: %s", kafka_stream, exc)
                            continue
                        except Exception as exc:  # noqa: BLE001 - no record ends the stream (decoder bugs included)
                            log.warning("skipping frame of %s: unexpected %s: %s", kafka_stream, type(exc).__name__, exc)
                            continue
                        yield FeedFrame(meta.frame_idx, meta.pts, image)
                        fed += 1
        finally:
            consumer.close()

    return frames
