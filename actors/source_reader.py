"""Streams' video sources (files, folders, http(s) and RTSP URLs) read and decoded in a reader actor.

Why: the control API fed each stream from a thread of its replica, so decoding (and copying every
frame into the object store) shared the replica's one core with the HTTP loop and the session's
driver. Measured with bench/serve_overload_bench.py --ingress direct --clip
../shared/videos/01_dog.mp4 (a 720p stream paced at 30 fps) during 200-request floods, two runs
each: the replica used 0.92-0.99 cores with the decoding in it, 0.76-0.82 with it here (this actor:
0.18-0.24 cores). The app's 503s to frame.jpg floods came back in 80-126 ms p50 instead of 92-150 ms,
which is within this machine's run-to-run noise; the freed core share is the steadier figure.

One actor serves every stream of its caller (threads, not processes), and it stays light: it imports
no torch (measured: 0.5 s and 76 MB to import what it needs).

`next_frame()` is called with two returns, `(meta, pixels)`: the caller owns both (Ray makes the
submitter of a call the owner of its results), so a frame outlives this actor, and the pixels stay
in the object store, never copied into the caller.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from masklet.actors.backend import first_line
from masklet.actors.runtime import in_actor_process, keep_freed_memory, limit_threads
from masklet.actors.sources import set_decode_threads

AHEAD = 2          # frames decoded ahead of the caller (bounded: a fast file never runs away)
WAIT_S = 1.0       # a call with no frame ready returns after this long, with the counters so far


class CountedEvents:
    """Stands in for a Stats in the source's reader: counter increments (reconnects) are kept until
    the next answer carries them to the caller, whose Stats records them. Filled by the reading
    thread, taken by calls: hence the lock."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, float, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def inc(self, name: str, amount: float = 1, **labels: Any) -> None:
        with self._lock:
            self._pending.append((name, amount, labels))

    def take(self) -> list[tuple[str, float, dict[str, Any]]]:
        with self._lock:
            taken, self._pending = self._pending, []
        return taken


class _Source:
    """One source: a thread reads `frames(stop)` into a bounded queue."""

    def __init__(self, frames: Callable[[threading.Event], Iterator[Any]], counts: CountedEvents) -> None:
        self.counts = counts
        self.stop = threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=AHEAD)
        self.done = False
        self.thread = threading.Thread(target=self._read, args=(frames,), name="source-reader", daemon=True)
        self.thread.start()

    def _read(self, frames: Callable[[threading.Event], Iterator[Any]]) -> None:
        try:
            for frame in frames(self.stop):
                if not self._offer(("frame", frame)):
                    return
            self._offer(("end", None))
        except Exception as exc:  # noqa: BLE001 - any failure of the source ends it, with its reason
            self._offer(("error", first_line(exc)))

    def _offer(self, item: tuple[str, Any]) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False


class SourceReader:
    """Reads and decodes the sources of many streams, each on its own thread, in one process: a
    stream is a row here, not a process (an actor per stream cost a worker start-up and its memory
    each). Give it `max_concurrency` above the number of streams, so that a call waiting for one
    stream's frame never holds up another's; keep one call per stream in flight, so frames come in
    order.

    `open(key, make_frames)`: `make_frames(stats=...)` gives the source's `frames(stop)` generator of
    frames with `frame_idx`, `pts`, `rgb` (uint8 [H, W, 3]) and `fps` (deploy.feeders.source_frames,
    passed in by the caller: actors never import the layers above them)."""

    def __init__(self) -> None:
        if in_actor_process():
            limit_threads(1)
            set_decode_threads(1)  # FFmpeg's frame threads cost CPU and a frame of latency each
            keep_freed_memory()    # every frame is a fresh frame-sized array, freed once stored
        self._sources: dict[str, _Source] = {}
        self._lock = threading.Lock()

    def open(self, key: str, make_frames: Callable[..., Callable[[threading.Event], Iterator[Any]]]) -> None:
        counts = CountedEvents()
        source = _Source(make_frames(stats=counts), counts)
        with self._lock:
            previous, self._sources[key] = self._sources.get(key), source
        if previous is not None:
            previous.stop.set()

    def next_frame(self, key: str, wait_s: float = WAIT_S) -> tuple[dict[str, Any], Any]:
        """(meta, pixels). meta["kind"]: "frame" (pixels: uint8 [H, W, 3]), "waiting" (nothing within
        `wait_s`), "end" or "error" (meta["reason"]: the source's one-line reason; also for a key that
        is not open); meta["counters"]: the counter increments since the last answer."""
        with self._lock:
            source = self._sources.get(key)
        if source is None:
            return {"kind": "error", "reason": f"source {key!r} is not open", "counters": []}, None
        if source.done:
            return {"kind": "end", "counters": source.counts.take()}, None
        try:
            kind, value = source.queue.get(timeout=wait_s)
        except queue.Empty:
            return {"kind": "waiting", "counters": source.counts.take()}, None
        if kind != "frame":
            source.done = True
            return {"kind": kind, "reason": value, "counters": source.counts.take()}, None
        height, width = value.rgb.shape[:2]
        return {"kind": "frame", "frame_idx": int(value.frame_idx), "pts": float(value.pts), "fps": value.fps,
                "height": int(height), "width": int(width), "counters": source.counts.take()}, value.rgb

    def close(self, key: str) -> None:
        """Stop reading `key`'s source; its thread ends within a queue timeout (a blocked network read
        ends when the source's own timeout does)."""
        with self._lock:
            source = self._sources.pop(key, None)
        if source is not None:
            source.stop.set()

    def open_sources(self) -> list[str]:
        with self._lock:
            return sorted(self._sources)
