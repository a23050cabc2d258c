"""Live streams: push frames and prompts in, get one masklet record per processed frame out.

`LiveSession` is the streaming scheduler; `pipeline.engine.Engine` runs files to the end. Both use
the same `Executor` (one batched encoder across streams, objects packed onto tracker actors and
stepped in batches, decoders and publishers as actors). Per-stream logic lives in
`pipeline.live_state.LiveStream` (pure); `pipeline.live_round` runs one schedule -> execute ->
update round. The driver thread never touches pixels: JPEG/PNG frames are decoded in decoder
actors, records are built (RLE, bbox, area) in publisher actors, and the session lock is never
held while an actor works.

Semantics:
  * Backpressure: each stream has a bounded DROP_OLDEST queue; `submit_frame` never blocks. A
    dropped frame is counted (`masklet_frames_dropped_total{reason="queue_full"}`), reported in the
    stream's next record (`dropped_frames_since_last`) and its token is settled with that output.
    A frame not newer than the previous one is refused (`reason="out_of_order"`), counted and
    reported the same way. Frames the caller knows were lost upstream (`lost_before`) are reported
    in the next record's `lost_frames_since_last`.
  * One record per processed frame, `objects: []` when none. The image encoder is skipped for
    frames that no object (or held prompt) covers. An undecodable frame gives an output with
    `failure` set and no record.
  * Prompts name a frame k (`submit_prompt`):
      - k newer than every taken frame (the future, or still queued): held until that frame is
        processed; if k itself is dropped, it applies at the next processed frame.
      - k in the ring buffer (the last `ring_buffer_frames` processed frames): applied at k. A new
        object's tracker starts at k and catches up through the buffered frames (re-encoding those
        that were skipped). An `add` on an object already stepped past k ends its current tracker
        at k and starts a fresh one there. Frames >= k that were already published are published
        again, with `revision` one higher (`LiveConfig.revisions`), once the catch-up reaches them.
      - k older than the ring buffer: `PromptRejected("frame_too_old")` for add/refine; `remove`
        needs no pixels and applies from the first unpublished frame on.
    `refine` corrects the object's latest stepped frame (the model's `refine`); for a later frame it
    is held and runs right after that frame's step; for an earlier one it is refused
    ("not_latest_frame": use `add` at that frame to re-prompt). `remove` ends the object at k.
  * Recovery: every `snapshot_every` steps an object is snapshotted; when its tracker actor dies it
    is reopened from that snapshot (on any tracker actor) and replays the buffered frames since.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import numpy as np

from masklet.actors.backend import Backend
from masklet.actors.messages import PromptMessage
from masklet.actors.payloads import EncodedImage, ModelSpec, StoredFrame, StreamInfo
from masklet.actors.prompt_limits import PromptLimitError, check_object_count, prompt_to_model
from masklet.monitoring.stats import Stats, StatsSnapshot, merge
from masklet.pipeline import commands as c
from masklet.pipeline.executor import Executor
from masklet.pipeline.executor_config import publisher_mask_kernel
from masklet.pipeline.live_objects import Incarnation
from masklet.pipeline.live_round import StreamRuntime, run_round
from masklet.pipeline.live_state import LiveFrame, LiveStream
from masklet.pipeline.live_types import LiveConfig, LiveOutput, PromptRejected, StreamStatus

__all__ = ["LiveConfig", "LiveOutput", "LiveSession", "PromptRejected", "StreamStatus"]


class LiveSession:
    def __init__(self, backend: Backend, model: ModelSpec, config: LiveConfig = LiveConfig(), *,
                 on_output: Callable[[LiveOutput], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, executor: Optional[Executor] = None) -> None:
        self.backend, self.model, self.config = backend, model, config
        self.on_output = on_output
        self.clock = clock
        self.stats = Stats()
        self.events: deque[str] = deque(maxlen=200)
        self.executor = executor or Executor(backend, model, config.executor, clock=clock,
                                             on_event=lambda e: self.events.append(e.message))
        self._streams: dict[str, StreamRuntime] = {}
        self._serial = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._queued: list[Any] = []        # commands from API threads, sent by the driver
        self._outbox: list[LiveOutput] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._shut = False
        self.executor.start()

    @property
    def tracker_restarts(self) -> int:
        return self.executor.tracker_restarts

    @property
    def encoder_restarts(self) -> int:
        return self.executor.encoder_restarts

    # -- streams ------------------------------------------------------------------------------

    def open_stream(self, stream_id: str, width: int, height: int, fps: float | None = None, *,
                    source_type: str = "live", published_until: Optional[int] = None,
                    revision_floor: int = 0) -> None:
        """`published_until`/`revision_floor`: after a restart, frames up to `published_until` were
        published before (revisions up to `revision_floor`); republishing them starts above it."""
        with self._lock:
            if stream_id in self._streams:
                raise ValueError(f"stream {stream_id!r} is already open")
            if len(self._streams) >= self.config.max_streams:
                raise ValueError(f"max_streams ({self.config.max_streams}) reached; close a stream first")
            if width < 1 or height < 1:
                raise ValueError(f"frame size must be positive, got {width}x{height}")
            cfg = self.config
            state = LiveStream(stream_id, width, height, fps, queue_capacity=cfg.queue_capacity,
                               ring_frames=cfg.ring_buffer_frames, max_in_flight=cfg.max_in_flight,
                               snapshot_every=cfg.snapshot_every, source_type=source_type,
                               revisions=cfg.revisions, published_until=published_until,
                               revision_floor=revision_floor)
            self._streams[stream_id] = StreamRuntime(state)
            info = StreamInfo(stream_id, width, height, fps or 0.0, (), self.model.name, cfg.soft_masks,
                              return_records=True, mask_kernel=publisher_mask_kernel(self.model, height, width))
            self._queued.append(c.OpenPublisher(info))
            self.stats.set("masklet_active_streams", len(self._streams))
        self._wake.set()

    def close_stream(self, stream_id: str, timeout: float = 60.0) -> None:
        """Finish the stream's queued frames (their outputs reach `on_output` and the next `poll()`),
        then release its objects and publisher. Blocks until done or `timeout`, then releases anyway."""
        with self._lock:
            rt = self._stream(stream_id)
            rt.state.closing = True
        self._wake.set()
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            with self._lock:
                if rt.state.drained and not rt.awaiting:
                    break
            if self._thread is not None and self._thread.is_alive():
                time.sleep(0.005)
            else:
                self._outbox += self._poll(0.05)
        with self._lock:
            st = rt.state
            self._queued += [c.CloseObject(st.key(i)) for i in st.incs if i.opened]
            self._queued.append(c.ClosePublisher(stream_id))
            del self._streams[stream_id]
            self.stats.set("masklet_active_streams", len(self._streams))
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._outbox += self._poll(0.0)

    def streams(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def submit_frame(self, stream_id: str, frame_idx: int, pts: float, image: np.ndarray | EncodedImage | StoredFrame,
                     token: Any = None, *, lost_before: int = 0) -> None:
        """Queue a frame (uint8 RGB pixels, an EncodedImage a decoder actor will decode, or a StoredFrame
        already in the backend's store); never blocks (the oldest queued frame is dropped when the
        queue is full)."""
        with self._lock:
            st = self._stream(stream_id).state
            if st.closing:
                raise ValueError(f"stream {stream_id!r} is closing")
            if isinstance(image, EncodedImage):
                size, pixels, encoded = (image.height, image.width), None, image
            elif isinstance(image, StoredFrame):
                size, pixels, encoded = (image.height, image.width), image.pixels, None
            else:
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise ValueError(f"stream {stream_id!r} takes uint8 frames of shape {(st.height, st.width, 3)}, "
                                     f"got {image.dtype} {image.shape}")
                size, pixels, encoded = image.shape[:2], None, None
            if tuple(size) != (st.height, st.width):
                raise ValueError(f"stream {stream_id!r} takes frames of {st.width}x{st.height}, got {size[1]}x{size[0]}")
            if lost_before < 0:
                raise ValueError(f"lost_before must not be negative, got {lost_before}")
        if encoded is None and pixels is None:
            pixels = self.backend.put(image)  # the object store copy the stages read; outside the lock
        with self._lock:
            st = self._stream(stream_id).state
            self.stats.inc("masklet_frames_in_total", source_type=st.source_type)
            dropped = st.offer(LiveFrame(int(frame_idx), float(pts), pixels, encoded, token, self.clock(),
                                         lost_before=int(lost_before)))
            if dropped == "out_of_order":
                self.stats.inc("masklet_frames_dropped_total", reason="out_of_order")
            elif dropped is not None:
                self.stats.inc("masklet_frames_dropped_total", reason="queue_full")
        self._wake.set()

    def queue_room(self, stream_id: str) -> int:
        """Frames the stream's queue takes before it starts dropping (for callers that can wait)."""
        with self._lock:
            st = self._stream(stream_id).state
            return st.queue.capacity - len(st.queue)

    # -- prompts ------------------------------------------------------------------------------

    def submit_prompt(self, msg: PromptMessage) -> None:
        """add/refine/remove at `msg.frame_idx`; raises PromptRejected (see the module docstring)."""
        with self._lock:
            rt = self._streams.get(msg.stream_id)
            if rt is None or rt.state.closing:
                raise PromptRejected("unknown_stream", f"no open stream {msg.stream_id!r}")
            st, k = rt.state, msg.frame_idx
            current = st.active(msg.object_id)
            if msg.action == "remove":
                if current is None:
                    raise PromptRejected("unknown_object", f"stream {msg.stream_id!r} has no object {msg.object_id}")
                st.end_at(current, k)
                self._wake.set()
                return
            try:
                prompt = prompt_to_model(msg, st.height, st.width, self.config.limits)
                if current is None:
                    live = {i.object_id for i in st.incs if i.end is None}
                    total = sum(1 for r in self._streams.values() for i in r.state.incs if i.end is None)
                    check_object_count(msg.object_id, live, total, self.config.limits)
            except PromptLimitError as exc:
                raise PromptRejected(exc.reason, exc.detail) from None
            oldest, newest = st.oldest_buffered, st.newest_taken
            if newest is not None and k <= newest and k < oldest:
                raise PromptRejected("frame_too_old", f"frame {k} left the ring buffer (it holds {oldest}..{newest})")
            if msg.action == "refine":
                if current is None:
                    raise PromptRejected("unknown_object", f"stream {msg.stream_id!r} has no object {msg.object_id}")
                if current.cursor is not None and k < current.cursor:
                    raise PromptRejected("not_latest_frame", f"object {msg.object_id} is already at frame "
                                         f"{current.cursor}; refine corrects its latest frame (use add to re-prompt "
                                         f"frame {k})")
                current.refines[k] = prompt
            elif current is None:
                st.incs.append(Incarnation(msg.object_id, next(self._serial), k, adds={k: prompt}))
            elif current.cursor is not None and k <= current.cursor:
                st.end_at(current, k)  # re-prompt in the past: a fresh tracker from k
                fresh = Incarnation(msg.object_id, next(self._serial), k, adds={k: prompt})
                fresh.adds.update({f: p for f, p in current.adds.items() if f > k})
                fresh.refines.update({f: p for f, p in current.refines.items() if f > k})
                st.incs.append(fresh)
            else:
                current.adds[k] = prompt
                current.start = min(current.start, k) if current.cursor is None else current.start
        self._wake.set()

    # -- status -------------------------------------------------------------------------------

    def status(self, stream_id: str) -> StreamStatus:
        with self._lock:
            st, now = self._stream(stream_id).state, self.clock()
            recent = [t for t in st.publish_times if t > now - 3.0]
            fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
            return StreamStatus(stream_id, st.width, st.height, st.frames_in, st.frames_published, st.frames_dropped,
                                round(fps, 2), len(st.queue) + st.in_flight(),
                                {i.object_id: st.scores.get(i.object_id, 0.0) for i in st.incs if i.end is None},
                                st.frames_lost, st.revisions_published)

    def latest(self, stream_id: str) -> LiveOutput | None:
        # Without the session lock: two reference reads, atomic under the GIL. The control API asks
        # this on its event loop for every frame picture, and waiting there for a round that holds
        # the lock stalled every request behind it (4% of the loop's samples in a 720p flood).
        return self._stream(stream_id).latest

    def stats_snapshot(self) -> StatsSnapshot:
        with self._lock:
            own = self.stats.snapshot()
        return merge([own, self.executor.stats_snapshot()])

    def encoder_batch_sizes(self) -> dict[int, int]:
        return dict(self.executor.report()["encoder_batch_sizes"])

    # -- driving ------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> list[LiveOutput]:
        """Run rounds until no progress is possible now and either an output is ready or `timeout`
        seconds have passed; returns the outputs in order per stream (each also went to `on_output`)."""
        with self._lock:
            outputs, self._outbox = self._outbox, []
        return outputs + self._poll(timeout)

    def _poll(self, timeout: float) -> list[LiveOutput]:
        deadline = self.clock() + max(0.0, timeout)
        outputs: list[LiveOutput] = []
        while True:
            progressed = run_round(self, deadline, outputs)
            if not progressed and (outputs or self.clock() >= deadline):
                return outputs

    def start(self) -> None:
        """Drive `poll` from a background thread (outputs go to `on_output` and `latest`)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._drive, name="live-session", daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        while not self._stop.is_set():
            self.poll(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def shutdown(self) -> None:
        self.stop()
        with self._lock:
            self._streams.clear()
            self.stats.set("masklet_active_streams", 0)
        self.executor.shutdown()
        self._shut = True

    def _stream(self, stream_id: str) -> StreamRuntime:
        rt = self._streams.get(stream_id)
        if rt is None:
            raise KeyError(f"unknown stream {stream_id!r}")
        return rt
