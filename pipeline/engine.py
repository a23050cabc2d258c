"""The offline/streaming pipeline engine: a schedule -> execute -> update loop over actors.

    decoder (per stream) --frames--> batcher --batches--> encoder (one, shared)
        --embedding refs--> trackers (per stream and object) --mask refs--> publisher (per stream)

The engine owns no pixels: frames, embeddings and masks travel between actors as references (Ray
object store, or plain objects in-process); the driver only keeps the references and decides who
runs what next. Per-stream logic lives in `StreamController`; this module wires controllers to a
`Backend`, batches encoder work across streams and handles actor deaths:

  * encoder died: restart it and resubmit the batches it had not returned, in order;
  * tracker died: rebuild it from its last snapshot and replay the steps since (controller);
  * decoder/publisher died or a source failed: that stream fails with one line, the others go on.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from masklet.actors.payloads import ModelSpec, StreamInfo
from masklet.actors.decoder import DecoderActor
from masklet.actors.encoder import EncoderActor
from masklet.actors.publisher import PublisherActor
from masklet.actors.tracker import TrackerActor
from masklet.monitoring.stats import Stats, StatsSnapshot, merge
from masklet.actors.backend import ActorCallError, ActorDiedError, ActorHandle, ActorOptions, Backend, retire_actor
from masklet.pipeline.batching import DynamicBatcher
from masklet.pipeline.controller import (CreateTracker, Publish, Snapshot, StartBackward, Step, StreamController,
                                 StreamError)
from masklet.pipeline.engine_types import EngineConfig, EngineEvent, RunReport, StreamOutcome, StreamSpec

__all__ = ["Engine", "EngineConfig", "EngineEvent", "RunReport", "StreamOutcome", "StreamSpec"]


@dataclass
class _Pending:
    kind: str
    stream: "_Stream | None"
    payload: Any = None
    generation: int = 0


@dataclass
class _Stream:
    spec: StreamSpec
    ctrl: StreamController
    outcome: StreamOutcome
    decoder: ActorHandle
    publisher: ActorHandle | None = None
    trackers: dict[int, ActorHandle] = field(default_factory=dict)
    state: str = "opening"   # opening -> running -> done | failed
    reading: bool = False
    admitted_at: dict[int, float] = field(default_factory=dict)


class Engine:
    def __init__(self, backend: Backend, model: ModelSpec, config: EngineConfig = EngineConfig(),
                 on_event: Callable[[EngineEvent], None] | None = None,
                 on_progress: Callable[[StreamOutcome], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.model = model
        self.config = config
        self.on_event = on_event or (lambda event: None)
        self.on_progress = on_progress or (lambda outcome: None)
        self.clock = clock
        self.stats = Stats()
        self.batcher: DynamicBatcher = DynamicBatcher(config.max_batch_size, config.max_wait_ms)
        self.pending: dict[Any, _Pending] = {}
        self.encode_batches: list[tuple[int, list, list]] = []  # (generation, jobs, futures) in flight
        self.events: list[EngineEvent] = []
        self.snapshots: list[StatsSnapshot] = []
        self.encoder: ActorHandle | None = None
        self.encoder_restarts = 0
        self.tracker_restarts = 0
        self.streams: dict[str, _Stream] = {}

    # -- public -----------------------------------------------------------------------------

    def _threads(self, cap: int | None) -> int | None:
        # In-process "actors" share this process: capping threads there would change the caller's
        # own torch thread count (and with it float reduction order), so caps apply to real actors only.
        return cap if self.backend.separate_processes else None

    def start_encoder(self) -> ActorHandle:
        if self.encoder is None:
            self.encoder = self.backend.spawn(
                "encoder", EncoderActor, self.model, self._threads(self.config.encoder_threads),
                # passive OpenMP waits: spinning at barriers while trackers hold a core wasted CPU
                options=ActorOptions(num_cpus=0, num_gpus=self.config.encoder_gpus, env=(("OMP_WAIT_POLICY", "PASSIVE"),)))
        return self.encoder

    def run(self, streams: list[StreamSpec]) -> RunReport:
        self.start_encoder()
        for spec in streams:
            self._open_stream(spec)
        while any(s.state in ("opening", "running") for s in self.streams.values()):
            self._schedule()
            self._wait_and_update()
        report = self._finish()
        return report

    # -- schedule ---------------------------------------------------------------------------

    def _open_stream(self, spec: StreamSpec) -> None:
        if spec.stream_id in self.streams:
            raise ValueError(f"duplicate stream id {spec.stream_id!r}")
        c = self.config
        ctrl = StreamController(spec.stream_id, spec.objects, bidirectional=spec.bidirectional, policy=spec.policy,
                                queue_capacity=c.queue_capacity, replay_frames=c.replay_frames,
                                snapshot_every=c.snapshot_every, backward_delay=c.backward_delay)
        decoder = self.backend.spawn(f"{spec.stream_id}/decoder", DecoderActor, spec.opener, self._threads(1))
        s = _Stream(spec, ctrl, StreamOutcome(spec.stream_id, objects=len(ctrl.objects), started=self.clock()), decoder)
        self.streams[spec.stream_id] = s
        self._submit("open", s, self.backend.call(decoder, "open"))
        self.stats.inc("masklet_active_streams", 1)

    def _schedule(self) -> None:
        for s in self.streams.values():
            if s.state == "running" and not s.reading and s.ctrl.room() > 0:
                n = min(self.config.decode_chunk, s.ctrl.room())
                s.reading = True
                self._submit("read", s, self.backend.call(s.decoder, "read", n))
        now = self.clock()
        flush = not any(s.reading for s in self.streams.values())
        while self._encoder_room():
            batch = self.batcher.next_batch(now, flush=flush)
            if batch is None:
                break
            batch = [job for job in batch if self.streams[job[0]].state == "running"]
            if batch:
                self._submit_encode(batch)
        for s in self.streams.values():
            if s.state == "running":
                self._run_commands(s, s.ctrl.schedule())
                if s.ctrl.done and not any(p.stream is s for p in self.pending.values()):
                    self._close_stream(s)

    def _encoder_room(self) -> bool:
        live = sum(1 for g, _, _ in self.encode_batches if g == self.encoder.generation)
        return live < self.config.encoder_queue_depth

    def _submit(self, kind: str, stream: _Stream | None, future: Any, payload: Any = None, generation: int = 0) -> Any:
        self.pending[future] = _Pending(kind, stream, payload, generation)
        return future

    def _submit_encode(self, jobs: list) -> tuple:
        now = self.clock()
        for stream_id, frame_idx, _ in jobs:
            s = self.streams[stream_id]
            self.stats.observe("masklet_stage_latency_seconds", now - s.admitted_at.get(frame_idx, now), stage="queue")
        futures = self.backend.call(self.encoder, "encode", *[rgb for _, _, rgb in jobs], num_returns=len(jobs))
        futures = [futures] if len(jobs) == 1 else futures
        entry = (self.encoder.generation, jobs, futures)
        self.encode_batches.append(entry)
        for job, future in zip(jobs, futures):
            self._submit("embedding", self.streams[job[0]], future, job, self.encoder.generation)
        return entry

    def _run_commands(self, s: _Stream, commands: list) -> None:
        for cmd in commands:
            if isinstance(cmd, Step):
                tracker = s.trackers[cmd.object_id]
                f = self.backend.call(tracker, "step", cmd.direction, cmd.frame_idx, cmd.embedding, cmd.prompt)
                self._submit("step", s, f, cmd, tracker.generation)
            elif isinstance(cmd, Publish):
                f = self.backend.call(s.publisher, "publish", cmd.meta, cmd.rgb, *cmd.results)
                self._submit("publish", s, f, cmd.meta)
            elif isinstance(cmd, Snapshot):
                tracker = s.trackers[cmd.object_id]
                self._submit("snapshot", s, self.backend.call(tracker, "snapshot"), cmd, tracker.generation)
            elif isinstance(cmd, StartBackward):
                tracker = s.trackers[cmd.object_id]
                self._submit("tracker_call", s, self.backend.call(tracker, "start_backward"), cmd, tracker.generation)
            elif isinstance(cmd, CreateTracker):
                self._create_tracker(s, cmd)
            else:  # pragma: no cover - a controller/engine mismatch is a bug
                raise TypeError(f"unknown command {cmd!r}")

    def _create_tracker(self, s: _Stream, cmd: CreateTracker) -> None:
        args = (self.model, s.ctrl.video_size, cmd.object_id, self.config.soft_masks, cmd.snapshot,
                self._threads(self.config.tracker_threads))
        existing = s.trackers.get(cmd.object_id)
        if existing is None:
            s.trackers[cmd.object_id] = self.backend.spawn(
                f"{s.spec.stream_id}/tracker-{cmd.object_id}", TrackerActor, *args,
                options=ActorOptions(num_gpus=self.config.tracker_gpus))
        else:
            self.backend.restart(existing, *args)

    # -- wait and update --------------------------------------------------------------------

    def _wait_and_update(self) -> None:
        if not self.pending:
            deadline = self.batcher.deadline()
            if deadline is None:
                if any(s.state == "running" and s.ctrl.room() > 0 for s in self.streams.values()):
                    return
                stuck = [sid for sid, s in self.streams.items() if s.state in ("opening", "running")]
                for sid in stuck:  # nothing in flight and nothing can start: a bug, not a hang
                    self._fail(self.streams[sid], "pipeline stalled (no work in flight); this is a bug")
                return
            time.sleep(max(0.0, deadline - self.clock()))
            return
        # the batch deadline matters only while the encoder can take a batch (else: a busy loop)
        deadline = self.batcher.deadline() if self._encoder_room() else None
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        ready, _ = self.backend.wait(list(self.pending), timeout)
        for future in ready:
            pending = self.pending.pop(future, None)
            if pending is not None:
                self._update(future, pending)

    def _update(self, future: Any, p: _Pending) -> None:
        s = p.stream
        if p.kind == "embedding":
            self._on_embedding(future, p)
            return
        if s is None or s.state in ("done", "failed"):
            return
        try:
            value = self.backend.get(future)
        except ActorDiedError as exc:
            self._on_actor_died(s, p, str(exc))
            return
        except ActorCallError as exc:
            reason = exc.reason if exc.kind in ("InputError", "SourceError", "StreamError") else str(exc)
            self._fail(s, reason)
            return
        try:
            self._on_value(s, p, future, value)
        except StreamError as exc:
            self._fail(s, str(exc))

    def _on_value(self, s: _Stream, p: _Pending, future: Any, value: Any) -> None:
        if p.kind == "open":
            s.outcome.width, s.outcome.height, s.outcome.fps = value.width, value.height, value.fps
            s.outcome.frames_total = value.frame_count
            s.ctrl.set_video_size(value.width, value.height)
            info = StreamInfo(s.spec.stream_id, value.width, value.height, value.fps or 30.0,
                              tuple(sorted(s.ctrl.objects)), self.model.name, self.config.soft_masks)
            s.publisher = self.backend.spawn(f"{s.spec.stream_id}/publisher", PublisherActor, info, s.spec.sink_factory,
                                             num_threads=self._threads(1))
            self._submit("publisher_open", s, self.backend.call(s.publisher, "open"))
        elif p.kind == "publisher_open":
            if value:
                raise StreamError("; ".join(value))
            s.state = "running"
        elif p.kind == "read":
            s.reading = False
            self._admit(s, value)
        elif p.kind == "step":
            s.ctrl.on_step_done(p.payload.object_id, p.payload.frame_idx, future)
        elif p.kind == "snapshot":
            if p.generation == s.trackers[p.payload.object_id].generation:
                s.ctrl.on_snapshot_done(p.payload, future)
        elif p.kind == "publish":
            self._on_published(s, value)

    def _admit(self, s: _Stream, frames: list) -> None:
        if not frames:
            s.ctrl.end_input()
            return
        now = self.clock()
        for frame in frames:
            rgb = self.backend.put(frame.rgb)
            needs_encoding, dropped = s.ctrl.admit(frame.frame_idx, float(frame.pts), rgb)
            self.stats.inc("masklet_frames_in_total", source_type=s.spec.source_type)
            s.admitted_at[frame.frame_idx] = now
            if dropped is not None:
                self.batcher.remove(lambda job, sid=s.spec.stream_id, j=dropped: job[0] == sid and job[1] == j)
                self.stats.inc("masklet_frames_dropped_total", reason="queue_full")
                s.admitted_at.pop(dropped, None)
            if needs_encoding:
                self.batcher.add((s.spec.stream_id, frame.frame_idx, rgb), now)

    def _on_embedding(self, future: Any, p: _Pending) -> None:
        if p.generation != self.encoder.generation:
            return  # a batch of a dead encoder; it was resubmitted
        try:
            self.backend.get(future)  # Ray: maps the object store value, no copy
        except ActorDiedError as exc:
            self.pending[future] = p  # still unencoded: it goes back to the batcher with the others
            self._restart_encoder(str(exc))
            return
        except ActorCallError as exc:
            if p.stream is not None and p.stream.state == "running":
                self._fail(p.stream, f"encoder failed: {exc}")
            return
        self.encode_batches = [b for b in self.encode_batches if any(f in self.pending for f in b[2])]
        s = p.stream
        if s is not None and s.state == "running":
            s.ctrl.on_encoded(p.payload[1], future)

    def _on_published(self, s: _Stream, ack: Any) -> None:
        s.ctrl.on_published()
        s.outcome.frames_published += 1
        admitted = s.admitted_at.pop(ack.frame_idx, None)
        if admitted is not None:
            self.stats.observe("masklet_end_to_end_latency_seconds", self.clock() - admitted)
        for message in ack.sink_errors:
            s.outcome.sink_errors.append(message)
            self._event("sink_error", s, message)
        self.on_progress(s.outcome)

    # -- faults -----------------------------------------------------------------------------

    def _on_actor_died(self, s: _Stream, p: _Pending, message: str) -> None:
        if p.kind in ("step", "snapshot", "tracker_call"):
            tracker = s.trackers[p.payload.object_id]
            if p.generation != tracker.generation:
                return  # already replaced
            self.tracker_restarts += 1
            if self.tracker_restarts > self.config.max_tracker_restarts:
                self._fail(s, f"tracker of object {p.payload.object_id} keeps dying: {message}")
                return
            self._event("tracker_restarted", s, f"object {p.payload.object_id}: {message}; resuming from snapshot")
            self._run_commands(s, s.ctrl.on_tracker_lost(p.payload.object_id))
        elif p.kind in ("read", "open"):
            self._fail(s, f"decoder died: {message}")
        else:
            self._fail(s, f"publisher died ({message}); outputs are incomplete")

    def _restart_encoder(self, message: str) -> None:
        dead = self.encoder.generation
        self.encoder_restarts += 1
        if self.encoder_restarts > self.config.max_encoder_restarts:
            for s in self.streams.values():
                if s.state in ("opening", "running"):
                    self._fail(s, f"encoder keeps dying: {message}")
            return
        self._event("encoder_restarted", None, f"encoder died ({message}); retrying its in-flight frames")
        lost = [job for g, jobs, futures in self.encode_batches if g == dead for job, f in zip(jobs, futures)
                if f in self.pending]
        for f in [f for f, q in self.pending.items() if q.kind == "embedding" and q.generation == dead]:
            del self.pending[f]
        self.encode_batches = [b for b in self.encode_batches if b[0] != dead]
        self.backend.restart(self.encoder)
        self.batcher.requeue_front(lost, self.clock())

    def _fail(self, s: _Stream, reason: str) -> None:
        if s.state in ("done", "failed"):
            return
        s.state = "failed"
        s.outcome.error = reason
        s.outcome.finished = self.clock()
        self._event("stream_failed", s, reason)
        self.batcher.remove(lambda job: job[0] == s.spec.stream_id)
        if s.publisher is not None:
            try:  # keep what was written readable (a partial video is still a valid file)
                self.backend.get(self.backend.call(s.publisher, "close"))
            except (ActorDiedError, ActorCallError):
                pass
        self._release_actors(s)

    def _close_stream(self, s: _Stream) -> None:
        try:
            errors = self.backend.get(self.backend.call(s.publisher, "close"))
        except (ActorDiedError, ActorCallError) as exc:
            errors = (f"publisher failed to finish: {exc}",)
        for message in errors:
            s.outcome.sink_errors.append(message)
            self._event("sink_error", s, message)
        s.state = "done"
        s.outcome.finished = self.clock()
        self._event("stream_done", s, f"{s.outcome.frames_published} frames")
        self._release_actors(s)

    def _release_actors(self, s: _Stream) -> None:
        self.stats.inc("masklet_active_streams", -1)
        for f in [f for f, q in self.pending.items() if q.stream is s]:
            del self.pending[f]
        for actor in [s.decoder, s.publisher, *s.trackers.values()]:
            if actor is not None and (snapshot := retire_actor(self.backend, actor)) is not None:
                self.snapshots.append(snapshot)

    def _event(self, kind: str, s: _Stream | None, message: str) -> None:
        event = EngineEvent(kind, None if s is None else s.spec.stream_id, message)
        self.events.append(event)
        self.on_event(event)

    def _finish(self) -> RunReport:
        batch_sizes: Counter = Counter()
        if self.encoder is not None:
            try:
                report = self.backend.get(self.backend.call(self.encoder, "report"))
                batch_sizes.update(report["batch_sizes"])
                self.snapshots.append(self.backend.get(self.backend.call(self.encoder, "stats_snapshot")))
            except (ActorDiedError, ActorCallError):
                pass
        stats = merge([self.stats.snapshot(), *self.snapshots])
        return RunReport({sid: s.outcome for sid, s in self.streams.items()}, self.events, batch_sizes, stats,
                         self.encoder_restarts, self.tracker_restarts)

    def shutdown(self) -> None:
        if self.encoder is not None:
            self.backend.kill(self.encoder)
            self.encoder = None
