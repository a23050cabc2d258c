"""Live streams: push frames and prompts in, get one masklet record per processed frame out.

`LiveSession` is the streaming counterpart of `pipeline.engine.Engine` (which runs files to the
end). It reuses the same actors over the same `Backend`: one shared, batched `EncoderActor`
(embeddings cross actors as `EmbeddingPayload`) and one `TrackerActor` per (stream, object).
Each `poll()` runs schedule -> execute -> update rounds: per-stream logic lives in
`pipeline.live_state.LiveStream` (pure), cross-stream batching in `DynamicBatcher`.

Semantics (issue 4):
  * Backpressure: each stream has a bounded `DROP_OLDEST` queue; `submit_frame` never blocks. A
    dropped frame is counted (`masklet_frames_dropped_total{reason="queue_full"}`), reported in the
    stream's next record (`dropped_frames_since_last`) and its token is settled with that output.
    A frame not newer than the previous one is refused (`reason="out_of_order"`); its token is
    settled with the next output too, without a count in the record (it is a duplicate).
  * One record per processed frame, `objects: []` when none. The image encoder is skipped for
    frames that no object (or held prompt) covers.
  * Prompts name a frame k (`submit_prompt`):
      - k newer than every taken frame (the future, or still queued): held until that frame is
        processed; if k itself is dropped, it applies at the next processed frame.
      - k in the ring buffer (the last `ring_buffer_frames` processed frames): applied at k. A new
        object's tracker starts at k and catches up through the buffered frames (re-encoding those
        that were skipped). An `add` on an object already stepped past k ends its current tracker
        at k and starts a fresh one there. Records already published for frames >= k are NOT
        re-published: the catch-up only builds the tracker's memory, and the object appears from
        the first unpublished frame on (`(stream_id, frame_idx)` stays unique per session).
      - k older than the ring buffer: `PromptRejected("frame_too_old")` for add/refine (we refuse
        rather than guess at a frame the user did not name); `remove` needs no pixels and applies
        from the first unpublished frame on.
    `refine` corrects the object's latest stepped frame (the model's `refine`); for a later frame it
    is held and runs right after that frame's step; for an earlier one it is refused
    ("not_latest_frame": use `add` at that frame to re-prompt). `remove` ends the object's
    tracker at k; its actor is released once every frame before k is published.
  * Tracker loss: every `snapshot_every` steps a tracker snapshot is taken; a dead tracker restarts
    from it and replays the buffered frames since. Encoder loss: restarted, lost frames re-queued.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from masklet.actors.payloads import FrameMeta, ModelSpec
from masklet.actors.encoder import EncoderActor
from masklet.actors.publisher import build_record
from masklet.actors.tracker import TrackerActor
from masklet.model.types import Prompt
from masklet.monitoring.stats import Stats, StatsSnapshot, merge
from masklet.actors.backend import ActorCallError, ActorDiedError, ActorHandle, ActorOptions, Backend, retire_actor
from masklet.pipeline.batching import DynamicBatcher
from masklet.pipeline.config import require_bounds
from masklet.pipeline.live_state import Incarnation, LiveFrame, LiveStream
from masklet.actors.messages import MaskletRecord, PromptMessage
from masklet.actors.rle import RleError, decode_rle


@dataclass(frozen=True)
class LiveConfig:
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    queue_capacity: int = 8              # per stream, DROP_OLDEST: every drop counted and reported
    ring_buffer_frames: int = 32         # recent frames kept per stream for late prompts
    snapshot_every: int = 30
    soft_masks: bool = False
    max_streams: int = 16
    max_in_flight: int = 4               # per stream: frames taken from the queue, not yet published
    encoder_queue_depth: int = 2         # encoder batches submitted ahead, so the encoder never idles
    encoder_threads: int | None = None
    tracker_threads: int | None = 1
    encoder_gpus: float = 0.0
    tracker_gpus: float = 0.0
    max_tracker_restarts: int = 8
    max_encoder_restarts: int = 3

    def __post_init__(self) -> None:
        require_bounds(self, at_least_one=("max_batch_size", "queue_capacity", "ring_buffer_frames", "snapshot_every",
                                           "max_streams", "max_in_flight", "encoder_queue_depth"),
                       non_negative=("max_wait_ms",))
        if self.snapshot_every > self.ring_buffer_frames:
            raise ValueError(f"snapshot_every ({self.snapshot_every}) must not exceed ring_buffer_frames "
                             f"({self.ring_buffer_frames}), or a restarted tracker cannot replay to its snapshot")


@dataclass(frozen=True)
class LiveOutput:
    record: MaskletRecord                # masklet/v1, one per processed input frame (objects: [] when none)
    rgb: np.ndarray                      # the frame (H, W, 3) uint8, for previews/overlays
    masks: dict[int, np.ndarray]         # object_id -> bool [H, W]
    tokens: tuple                        # submit tokens settled: dropped/late frames since the last output, then its own


@dataclass(frozen=True)
class StreamStatus:
    stream_id: str
    width: int
    height: int
    frames_in: int
    frames_published: int
    frames_dropped: int
    fps: float                           # published frames per second over the last few seconds
    lag_frames: int                      # submitted, not yet published (queued + in flight)
    objects: dict[int, float]            # object_id -> last presence score


class PromptRejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class _Call:
    kind: str                 # embedding | result | snapshot | aux
    stream_id: str | None
    frame_idx: int = -1
    key: tuple[int, int] | None = None
    generation: int = 0
    seq: int = 0
    encoder_generation: int = 0


@dataclass
class _Stream:
    state: LiveStream
    trackers: dict[tuple[int, int], ActorHandle] = field(default_factory=dict)
    latest: LiveOutput | None = None


class LiveSession:
    def __init__(self, backend: Backend, model: ModelSpec, config: LiveConfig = LiveConfig(), *,
                 on_output: Callable[[LiveOutput], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend, self.model, self.config = backend, model, config
        self.on_output = on_output
        self.clock = clock
        self.stats = Stats()
        self.events: deque[str] = deque(maxlen=200)
        self.batcher: DynamicBatcher = DynamicBatcher(config.max_batch_size, config.max_wait_ms)
        self._streams: dict[str, _Stream] = {}
        self._pending: dict[Any, _Call] = {}
        self._encoding: list[tuple[int, list, list]] = []   # (encoder generation, jobs, futures)
        self._seq = itertools.count()
        self._serial = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._outbox: list[LiveOutput] = []
        self._retired_stats: list[StatsSnapshot] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.tracker_restarts = self.encoder_restarts = 0
        self._shut = False
        threads = config.encoder_threads if backend.separate_processes else None
        self.encoder = backend.spawn("live/encoder", EncoderActor, model, threads,
                                     options=ActorOptions(num_cpus=0, num_gpus=config.encoder_gpus))

    # -- streams ------------------------------------------------------------------------------

    def open_stream(self, stream_id: str, width: int, height: int, fps: float | None = None, *,
                    source_type: str = "live") -> None:
        with self._lock:
            if stream_id in self._streams:
                raise ValueError(f"stream {stream_id!r} is already open")
            if len(self._streams) >= self.config.max_streams:
                raise ValueError(f"max_streams ({self.config.max_streams}) reached; close a stream first")
            if width < 1 or height < 1:
                raise ValueError(f"frame size must be positive, got {width}x{height}")
            c = self.config
            self._streams[stream_id] = _Stream(LiveStream(
                stream_id, width, height, fps, queue_capacity=c.queue_capacity, ring_frames=c.ring_buffer_frames,
                max_in_flight=c.max_in_flight, snapshot_every=c.snapshot_every, source_type=source_type))
            self.stats.set("masklet_active_streams", len(self._streams))

    def close_stream(self, stream_id: str, timeout: float = 60.0) -> None:
        """Finish the stream's queued frames (their outputs reach `on_output` and the next `poll()`),
        then release its tracker actors. Blocks until done or `timeout`, then releases anyway."""
        with self._lock:
            s = self._stream(stream_id)
            s.state.closing = True
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            with self._lock:
                if s.state.drained:
                    break
            if self._thread is not None and self._thread.is_alive():
                time.sleep(0.005)
            else:
                self._outbox += self._poll(0.05)
        with self._lock:
            for key in list(s.trackers):
                self._retire(s, key)
            self.batcher.remove(lambda job: job[0] == stream_id)
            del self._streams[stream_id]
            self.stats.set("masklet_active_streams", len(self._streams))

    def streams(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def submit_frame(self, stream_id: str, frame_idx: int, pts: float, rgb: np.ndarray, token: Any = None) -> None:
        """Queue a frame; never blocks (the oldest queued frame is dropped when the queue is full)."""
        with self._lock:
            s = self._stream(stream_id)
            st = s.state
            if st.closing:
                raise ValueError(f"stream {stream_id!r} is closing")
            if rgb.dtype != np.uint8 or rgb.shape != (st.height, st.width, 3):
                raise ValueError(f"stream {stream_id!r} takes uint8 frames of shape {(st.height, st.width, 3)}, "
                                 f"got {rgb.dtype} {rgb.shape}")
            self.stats.inc("masklet_frames_in_total", source_type=st.source_type)
            dropped = st.offer(LiveFrame(int(frame_idx), float(pts), rgb, token, self.clock()))
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
            s = self._streams.get(msg.stream_id)
            if s is None or s.state.closing:
                raise PromptRejected("unknown_stream", f"no open stream {msg.stream_id!r}")
            st, k = s.state, msg.frame_idx
            current = st.active(msg.object_id)
            if msg.action == "remove":
                if current is None:
                    raise PromptRejected("unknown_object", f"stream {msg.stream_id!r} has no object {msg.object_id}")
                st.end_at(current, k)
                self._wake.set()
                return
            prompt = self._to_prompt(msg, st)
            oldest, newest = st.oldest_buffered, st.newest_taken
            if newest is not None and k <= newest and k < oldest:
                raise PromptRejected("frame_too_old", f"frame {k} left the ring buffer (it holds {oldest}..{newest})")
            if msg.action == "refine":
                self._refine(st, current, msg, prompt)
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

    @staticmethod
    def _refine(st: LiveStream, current: Incarnation | None, msg: PromptMessage, prompt: Prompt) -> None:
        if current is None:
            raise PromptRejected("unknown_object", f"stream {msg.stream_id!r} has no object {msg.object_id}")
        if current.cursor is not None and msg.frame_idx < current.cursor:
            raise PromptRejected("not_latest_frame", f"object {msg.object_id} is already at frame {current.cursor}; "
                                 f"refine corrects its latest frame (use add to re-prompt frame {msg.frame_idx})")
        current.refines[msg.frame_idx] = prompt

    @staticmethod
    def _to_prompt(msg: PromptMessage, st: LiveStream) -> Prompt:
        mask = None
        if msg.mask is not None:
            try:
                mask = decode_rle({"size": list(msg.mask.size), "counts": msg.mask.counts})
            except RleError as exc:
                raise PromptRejected("invalid_prompt", str(exc)) from None
        try:
            prompt = Prompt(points=np.asarray(msg.points, np.float32) if msg.points else None,
                            labels=np.asarray(msg.labels, np.int64) if msg.points else None,
                            box=None if msg.box is None else np.asarray(msg.box, np.float32), mask=mask)
        except ValueError as exc:
            raise PromptRejected("invalid_prompt", str(exc)) from None
        try:
            prompt.check_inside((st.height, st.width))
        except ValueError as exc:
            raise PromptRejected("out_of_range", str(exc)) from None
        return prompt

    # -- status -------------------------------------------------------------------------------

    def status(self, stream_id: str) -> StreamStatus:
        with self._lock:
            s = self._stream(stream_id)
            st, now = s.state, self.clock()
            recent = [t for t in st.publish_times if t > now - 3.0]
            fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
            return StreamStatus(stream_id, st.width, st.height, st.frames_in, st.frames_published, st.frames_dropped,
                                round(fps, 2), len(st.queue) + st.in_flight(),
                                {i.object_id: st.scores.get(i.object_id, 0.0) for i in st.incs if i.end is None})

    def latest(self, stream_id: str) -> LiveOutput | None:
        with self._lock:
            return self._stream(stream_id).latest

    def stats_snapshot(self) -> StatsSnapshot:
        with self._lock:
            actors = [] if self._shut else [self.encoder]
            actors += [a for s in self._streams.values() for a in s.trackers.values()]
            snaps = [self.stats.snapshot(), *self._retired_stats]
        for actor in actors:
            try:
                snaps.append(self.backend.get(self.backend.call(actor, "stats_snapshot")))
            except (ActorDiedError, ActorCallError):
                pass
        return merge(snaps)

    def encoder_batch_sizes(self) -> dict[int, int]:
        return dict(self.backend.get(self.backend.call(self.encoder, "report"))["batch_sizes"])

    # -- driving ------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> list[LiveOutput]:
        """Run schedule -> execute -> update rounds until no progress is possible now and either an
        output is ready or `timeout` seconds have passed; returns the finished outputs in order per
        stream (each was also passed to `on_output`)."""
        with self._lock:
            outputs, self._outbox = self._outbox, []
        return outputs + self._poll(timeout)

    def _poll(self, timeout: float) -> list[LiveOutput]:
        from masklet.pipeline.live_exec import run_round

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
            for s in self._streams.values():
                for key in list(s.trackers):
                    self._retire(s, key)
            self._streams.clear()
            try:  # keep the encoder's counters: stats_snapshot() stays meaningful after shutdown
                self._retired_stats.append(self.backend.get(self.backend.call(self.encoder, "stats_snapshot")))
            except (ActorDiedError, ActorCallError):
                pass
            self.backend.kill(self.encoder)
            self._shut = True
            self.stats.set("masklet_active_streams", 0)

    # -- helpers shared with live_exec ----------------------------------------------------------

    def _stream(self, stream_id: str) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise KeyError(f"unknown stream {stream_id!r}")
        return s

    def _retire(self, s: _Stream, key: tuple[int, int]) -> None:
        actor = s.trackers.pop(key, None)
        if actor is not None and (snapshot := retire_actor(self.backend, actor)) is not None:
            self._retired_stats.append(snapshot)

    def _spawn_tracker(self, s: _Stream, key: tuple[int, int], snapshot: Any = None) -> ActorHandle:
        st = s.state
        threads = self.config.tracker_threads if self.backend.separate_processes else None
        args = (self.model, (st.height, st.width), key[0], self.config.soft_masks, snapshot, threads)
        actor = s.trackers.get(key)
        if actor is None:
            actor = s.trackers[key] = self.backend.spawn(
                f"live/{st.stream_id}/tracker-{key[0]}.{key[1]}", TrackerActor, *args,
                options=ActorOptions(num_gpus=self.config.tracker_gpus))
        else:
            self.backend.restart(actor, *args)
        return actor

    def _output(self, s: _Stream, frame: LiveFrame, masks: list) -> LiveOutput:
        st = s.state
        meta = FrameMeta(st.stream_id, frame.frame_idx, frame.pts, st.width, st.height, frame.dropped_before)
        record = build_record(meta, masks, self.model.name)
        out = LiveOutput(record, frame.rgb, {m.object_id: m.mask for m in masks}, frame.tokens)
        now = self.clock()
        st.frames_published += 1
        st.publish_times = [t for t in st.publish_times[-63:] if t > now - 3.0] + [now]
        st.scores.update({m.object_id: float(m.score) for m in masks})
        s.latest = out
        self.stats.inc("masklet_frames_published_total")
        self.stats.observe("masklet_end_to_end_latency_seconds", now - frame.submitted_at)
        return out


__all__ = ["LiveConfig", "LiveOutput", "LiveSession", "PromptRejected", "StreamStatus"]
