"""What the control API holds between requests: the LiveSession (maybe still loading), the feeders
of its streams, and the fan-out of masklet records to server-sent-event subscribers.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import HTTPException

from masklet.deploy.api_models import CreateStream
from masklet.deploy.api_security import ApiLimits
from masklet.deploy.feeders import Feeder, ReaderPool, actor_source_frames, kafka_frames, source_frames, source_type_of
from masklet.monitoring.stats import Stats
from masklet.pipeline.config import DEFAULT_MAX_PIXELS, KafkaSettings

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
LOADING_RETRY_AFTER_S = "5"
SUBSCRIBER_QUEUE = 32  # records buffered per SSE client; a slow client loses the oldest, never stalls others


def unavailable(detail: str, retry_after: str = RETRY_AFTER_S) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": retry_after})


class SessionSlot:
    """The LiveSession, or why there is none yet (model loading) or any more (load failed)."""

    def __init__(self, session: Any = None) -> None:
        self.session = session
        self.error: Optional[str] = None
        self._on_ready: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()

    def when_ready(self, hook: Callable[[Any], None]) -> None:
        """Run `hook(session)` now if the session is there, else as soon as it has loaded."""
        with self._lock:
            if self.session is None:
                self._on_ready.append(hook)
                return
        hook(self.session)

    def _set(self, session: Any) -> None:
        with self._lock:
            self.session, hooks, self._on_ready = session, self._on_ready, []
        for hook in hooks:
            hook(session)

    @property
    def state(self) -> str:
        return "ready" if self.session is not None else "failed" if self.error else "loading"

    def load_in_background(self, build: Callable[[], Any]) -> threading.Thread:
        def load() -> None:
            try:
                self._set(build())
            except Exception as exc:  # readiness reports it; the process stays up for /health
                log.exception("loading the LiveSession failed")
                self.error = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=load, name="masklet-session-loader", daemon=True)
        thread.start()
        return thread

    def require(self) -> Any:
        if self.session is None:
            if self.error:
                raise unavailable(f"pipeline failed to load: {self.error}", LOADING_RETRY_AFTER_S)
            raise unavailable("model is loading; retry shortly", LOADING_RETRY_AFTER_S)
        return self.session


class KafkaProbe:
    """Is any bootstrap server accepting TCP connections? Cached so /health/ready stays cheap."""

    def __init__(self, settings: KafkaSettings, timeout_s: float = 0.5, cache_s: float = 2.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._checked_at = -1e9
        self._result: tuple[bool, str] = (False, "kafka reachability not checked yet")
        self._lock = threading.Lock()

    def __call__(self) -> tuple[bool, str]:
        # One check at a time, and nobody waits for it: while one runs (a slow DNS answer is not
        # bounded by timeout_s), other callers get the latest answer. Readiness probes retry.
        if not self._lock.acquire(blocking=False):
            return self._result
        try:
            if time.monotonic() - self._checked_at > self.cache_s:
                self._result = self._probe()
                self._checked_at = time.monotonic()
            return self._result
        finally:
            self._lock.release()

    def _probe(self) -> tuple[bool, str]:
        for server in self.settings.bootstrap_server_list:
            host, _, port = server.rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=self.timeout_s):
                    return True, f"kafka reachable at {server}"
            except OSError:
                continue
        return False, f"kafka unreachable at {self.settings.bootstrap_servers}"


class OutputHub:
    """Hands each masklet record to the SSE subscribers of its stream.

    It hooks the session's `on_output` (chaining any callback already there) and relies on the
    session's own driver thread (`LiveSession.start()`): a second poller would race it.
    """

    def __init__(self, max_subscribers: int = 32) -> None:
        self.max_subscribers = max_subscribers
        self._subscribers: dict[int, tuple[str, asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()

    def attach(self, session: Any) -> None:
        previous = getattr(session, "on_output", None)

        def on_output(output: Any) -> None:
            if previous is not None:
                previous(output)
            self.publish(output.record)

        session.on_output = on_output
        session.start()  # idempotent: a running driver is left as it is

    def subscribe(self, stream_id: str) -> tuple[int, asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        with self._lock:
            if len(self._subscribers) >= self.max_subscribers:
                raise unavailable(f"too many event subscribers ({self.max_subscribers}); retry later")
            key = id(queue)
            self._subscribers[key] = (stream_id, asyncio.get_running_loop(), queue)
        return key, queue

    def unsubscribe(self, key: int) -> None:
        with self._lock:
            self._subscribers.pop(key, None)

    def publish(self, record: Any) -> None:
        with self._lock:
            targets = [(loop, q) for sid, loop, q in self._subscribers.values() if sid == record.stream_id]
        if not targets:
            return
        text = record.to_json_bytes().decode("utf-8")
        for loop, queue in targets:
            try:
                loop.call_soon_threadsafe(_put_drop_oldest, queue, (f"{record.frame_idx}.{record.revision}", text))
            except RuntimeError:  # the subscriber's loop is closed: it is going away
                pass


def _check_local_source(source: str, local: str) -> None:
    """A path the server can stat, as a 422 with the reason (never a 500: name too long, NUL byte...)."""
    try:
        found = Path(local).exists()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise HTTPException(422, f"source {_short(source)}: cannot access ({reason})") from None
    if not found:
        raise HTTPException(422, f"source {_short(source)}: no such file or folder on the server")


def _short(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _lag(session: Any, stream_id: str) -> int:
    try:
        return int(session.status(stream_id).lag_frames)
    except (KeyError, ValueError):
        return 0


def _last_status_and_output(session: Any, stream_id: str) -> tuple[Any, Any]:
    try:
        return session.status(stream_id), session.latest(stream_id)
    except (KeyError, ValueError):
        return None, None


def _put_drop_oldest(queue: asyncio.Queue, item: Any) -> None:
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)


class StreamRegistry:
    """The API's streams: one feeder each, the stream cap, and object-id allocation."""

    def __init__(self, slot: SessionSlot, *, limits: ApiLimits, kafka: Optional[KafkaSettings],
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.slot = slot
        self.limits = limits
        self.kafka = kafka
        self.max_pixels = max_pixels
        self.stats = Stats()  # reconnects of network sources; merged into /metrics
        self._feeders: dict[str, Feeder] = {}
        self._next_object_id: dict[str, int] = {}
        self._closing: set[str] = set()
        self._readers: Optional[ReaderPool] = None  # the source reader actor, on Ray
        self._reader_keys = itertools.count()
        self._lock = threading.Lock()

    def create(self, request: CreateStream) -> Feeder:
        session = self.slot.require()
        if request.kafka_stream is not None:
            if self.kafka is None:
                raise HTTPException(422, "kafka_stream needs Kafka: start `masklet serve --kafka HOST:PORT`")
            frames = kafka_frames(self.kafka, request.kafka_stream, max_frames=request.max_frames,
                                  max_pixels=self.max_pixels)
            describe, source_type = f"kafka:{request.kafka_stream}", "kafka"
        else:
            source = request.source or ""
            local = source.removeprefix("file://")
            if "://" not in local:
                _check_local_source(source, local)
            make_frames = functools.partial(source_frames, source, realtime=request.realtime, loop=request.loop,
                                            max_frames=request.max_frames, max_pixels=self.max_pixels)
            backend = getattr(session, "backend", None)
            if getattr(backend, "separate_processes", False):  # decode in the reader actor, not in this replica
                if self._readers is None:
                    self._readers = ReaderPool(backend, self.limits.max_streams)
                key = f"{request.stream_id}#{next(self._reader_keys)}"  # an id can come back while its source closes
                frames = actor_source_frames(self._readers, key, make_frames, self.stats)
            else:
                frames = make_frames(stats=self.stats)
            describe, source_type = source, source_type_of(source)
        with self._lock:
            if request.stream_id in self._feeders:
                raise HTTPException(409, f"stream {request.stream_id!r} already exists")
            if request.stream_id in self._closing:
                raise HTTPException(409, f"stream {request.stream_id!r} is still closing; retry shortly",
                                    headers={"Retry-After": RETRY_AFTER_S})
            if self._active_count() >= self.limits.max_streams:
                raise unavailable(f"stream cap reached ({self.limits.max_streams} streams); delete one or retry later")
            self._forget_oldest_ended()
            feeder = Feeder(session, request.stream_id, describe, frames, source_type=source_type,
                            on_end=self._ended)
            self._feeders[request.stream_id] = feeder
            self._next_object_id[request.stream_id] = 1
        return feeder.start()

    def _active_count(self) -> int:
        """Streams holding a session slot: feeding, or ended and still draining out of the session.
        Finished and failed streams leave the cap once the session has closed them."""
        ended = {sid for sid, f in self._feeders.items() if f.status.state in ("finished", "failed")}
        return len(set(self._feeders) - ended) + len(self._closing)

    def _forget_oldest_ended(self) -> None:
        # Ended streams stay listed for inspection, but no more of them than the stream cap.
        ended = [sid for sid, f in self._feeders.items() if f.status.state in ("finished", "failed")
                 and sid not in self._closing]
        for sid in ended[: max(0, len(ended) - self.limits.max_streams)]:
            self._feeders.pop(sid, None)
            self._next_object_id.pop(sid, None)

    def _ended(self, feeder: Feeder) -> None:
        """A stream finished or failed: keep its last status and output, then leave the session."""
        session = self.slot.session
        if session is None or feeder.status.size is None:
            return
        with self._lock:
            if self._feeders.get(feeder.stream_id) is not feeder:
                return  # deleted meanwhile: delete() closes it
            self._closing.add(feeder.stream_id)
        threading.Thread(target=self._close, args=(session, feeder.stream_id, feeder), daemon=True,
                         name=f"close-{feeder.stream_id}").start()

    def get(self, stream_id: str) -> Feeder:
        with self._lock:
            feeder = self._feeders.get(stream_id)
        if feeder is None:
            raise HTTPException(404, f"no stream {stream_id!r}")
        return feeder

    def all(self) -> list[Feeder]:
        with self._lock:
            return list(self._feeders.values())

    def delete(self, stream_id: str) -> None:
        with self._lock:
            feeder = self._feeders.pop(stream_id, None)
            self._next_object_id.pop(stream_id, None)
            already_closing = stream_id in self._closing
        if feeder is None:
            raise HTTPException(404, f"no stream {stream_id!r}")
        feeder.stop(timeout=2.0)  # bounded: a feeder stuck in a network read is a daemon and dies later
        if feeder.status.size is None or self.slot.session is None or already_closing:
            return
        if feeder.status.state in ("finished", "failed") and feeder.status.last_status is not None:
            return  # ended and already closed in the session
        with self._lock:
            self._closing.add(stream_id)
        # LiveSession.close_stream drains the stream's queued frames and may take seconds: off the
        # request path, and the id stays reserved (409 on re-create) until it is done.
        threading.Thread(target=self._close, args=(self.slot.session, stream_id), daemon=True,
                         name=f"close-{stream_id}").start()

    def _close(self, session: Any, stream_id: str, ended: Optional[Feeder] = None, drain_s: float = 10.0) -> None:
        try:
            if ended is not None:
                # Let the session publish what is queued, keep the final figures for GET /streams/{id},
                # then free the session slot.
                deadline = time.monotonic() + drain_s
                while time.monotonic() < deadline and _lag(session, stream_id) > 0:
                    time.sleep(0.05)
                ended.status.last_status, ended.status.last_output = _last_status_and_output(session, stream_id)
            session.close_stream(stream_id, timeout=drain_s)
        except (KeyError, ValueError):
            pass  # already closed by the session
        finally:
            with self._lock:
                self._closing.discard(stream_id)

    def allocate_object_id(self, stream_id: str, requested: Optional[int], known: set[int]) -> int:
        with self._lock:
            if requested is not None:
                object_id = requested
            else:
                object_id = max([self._next_object_id.get(stream_id, 1), *(k + 1 for k in known)])
            self._next_object_id[stream_id] = max(self._next_object_id.get(stream_id, 1), object_id + 1)
            return object_id

    def shutdown(self) -> None:
        for feeder in self.all():
            feeder.stop(timeout=1.0)
        if self._readers is not None:
            self._readers.shutdown()
