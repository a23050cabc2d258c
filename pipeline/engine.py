"""The offline engine: files and archives to the end, over the shared executor.

    decoders (pooled) --frame refs--> encoder (one, batched across inputs) --embedding refs-->
        tracker actors (objects packed onto them, steps batched) --result refs--> publishers (pooled)

Per-stream logic lives in `FileStream` (pure: which frames may be read, stepped, published; when
to snapshot; what to replay). The `Executor` places and batches the work and recovers from actor
deaths. This module only runs the loop: schedule every stream, submit one round, update from
the completions, until every stream is done or failed:

  * a tracker actor died: each of its objects is reopened from its last snapshot (on any actor)
    and replays the steps since (`FileStream.on_tracker_lost`);
  * a source failed, or a decoder or publisher died: that stream fails with one line, the others
    go on.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from masklet.actors.payloads import ModelSpec, StreamInfo
from masklet.actors.backend import Backend
from masklet.monitoring.stats import merge
from masklet.pipeline import commands as c
from masklet.pipeline.engine_types import EngineConfig, EngineEvent, RunReport, StreamOutcome, StreamSpec
from masklet.pipeline.executor import Executor
from masklet.pipeline.executor_config import publisher_mask_kernel
from masklet.pipeline.file_stream import FileStream, StreamError

__all__ = ["Engine", "EngineConfig", "EngineEvent", "RunReport", "StreamOutcome", "StreamSpec"]

_IDLE_WAIT_S = 1.0  # longest single wait; completions end it early


@dataclass
class _Stream:
    spec: StreamSpec
    ctrl: FileStream
    outcome: StreamOutcome
    state: str = "opening"   # opening -> running -> closing -> done | failed
    reading: bool = False
    in_flight: int = 0       # publishes sent, not yet acknowledged
    admitted_at: dict[int, float] = field(default_factory=dict)


class Engine:
    def __init__(self, backend: Backend, model: ModelSpec, config: EngineConfig = EngineConfig(),
                 on_event: Callable[[EngineEvent], None] | None = None,
                 on_progress: Callable[[StreamOutcome], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, executor: Executor | None = None) -> None:
        self.backend, self.model, self.config, self.clock = backend, model, config, clock
        self.on_event = on_event or (lambda event: None)
        self.on_progress = on_progress or (lambda outcome: None)
        self.executor = executor or Executor(backend, model, config.executor, clock=clock,
                                             on_event=lambda e: self._event(e.kind, e.stream_id, e.message))
        self.events: list[EngineEvent] = []
        self.streams: dict[str, _Stream] = {}
        self._commands: list[Any] = []

    @property
    def stats(self):
        return self.executor.stats

    def start_encoder(self) -> None:
        self.executor.start()

    def run(self, streams: list[StreamSpec]) -> RunReport:
        self.executor.start()
        ids = [spec.stream_id for spec in streams]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate stream ids {duplicates}")
        waiting = list(streams)
        while waiting or self._active():
            while waiting and len(self._active()) < self.config.max_active_streams:
                self._open_stream(waiting.pop(0))  # archives: a bounded number of inputs at once
            self._schedule()
            self.executor.submit(self._take_commands())
            flush = not any(s.reading for s in self.streams.values())
            timeout = 0.0 if self._can_schedule() else _IDLE_WAIT_S
            completions = self.executor.poll(timeout, flush=flush)
            for done in completions:
                self._update(done)
            if not completions and not self.executor.busy and not self._can_schedule():
                for s in self._active():  # nothing in flight and nothing can start: a bug, not a hang
                    self._fail(s, "pipeline stalled (no work in flight); this is a bug")
        return self._finish()

    # -- schedule ---------------------------------------------------------------------------

    def _open_stream(self, spec: StreamSpec) -> None:
        if spec.stream_id in self.streams:
            raise ValueError(f"duplicate stream id {spec.stream_id!r}")
        cfg = self.config
        ctrl = FileStream(spec.stream_id, spec.objects, bidirectional=spec.bidirectional, policy=spec.policy,
                          publish_pixels=getattr(spec.sink_factory, "needs_pixels", True),
                          queue_capacity=cfg.queue_capacity, queue_bytes=cfg.queue_bytes, read_chunk=cfg.decode_chunk,
                          replay_frames=cfg.replay_frames, snapshot_every=cfg.snapshot_every,
                          backward_delay=cfg.backward_delay)
        self.streams[spec.stream_id] = _Stream(spec, ctrl, StreamOutcome(spec.stream_id, objects=len(ctrl.objects),
                                                                         started=self.clock()))
        self._commands.append(c.OpenSource(spec.stream_id, spec.opener))
        self.stats.inc("masklet_active_streams", 1)

    def _active(self) -> list[_Stream]:
        return [s for s in self.streams.values() if s.state in ("opening", "running", "closing")]

    def _room(self, s: _Stream) -> int:
        # Publishing is bounded too: frames sent to the publisher but not yet acknowledged count, so
        # a slow publisher (big masks, slow disk) holds reading back instead of piling frames up.
        return min(s.ctrl.room(), s.ctrl.queue_capacity - s.in_flight)

    def _can_schedule(self) -> bool:
        return any(s.state == "running" and not s.reading and self._room(s) > 0 for s in self.streams.values())

    def _schedule(self) -> None:
        for s in self.streams.values():
            if s.state != "running":
                continue
            if not s.reading and self._room(s) > 0:
                s.reading = True
                self._commands.append(c.ReadFrames(s.spec.stream_id, min(self.config.decode_chunk, self._room(s))))
            try:
                commands = s.ctrl.schedule()
            except StreamError as exc:
                self._fail(s, str(exc))
                continue
            for cmd in commands:
                if isinstance(cmd, c.Publish):
                    s.in_flight += 1
            self._commands += commands
            if s.ctrl.done and s.in_flight == 0 and not s.reading:
                self._close_stream(s)

    def _take_commands(self) -> list[Any]:
        out, self._commands = self._commands, []
        return out

    # -- update -----------------------------------------------------------------------------

    def _update(self, done: Any) -> None:
        sid = done.key.stream_id if isinstance(done, (c.StepDone, c.SnapshotTaken, c.ObjectFailed, c.ObjectLost)) \
            else done.stream_id
        s = self.streams.get(sid)
        if s is None or s.state in ("done", "failed"):
            return
        try:
            self._apply(s, done)
        except StreamError as exc:
            self._fail(s, str(exc))

    def _apply(self, s: _Stream, done: Any) -> None:
        if isinstance(done, c.SourceOpened):
            info = done.info
            s.outcome.width, s.outcome.height, s.outcome.fps = info.width, info.height, info.fps
            s.outcome.frames_total = info.frame_count
            s.ctrl.set_video_size(info.width, info.height)
            stream_info = StreamInfo(s.spec.stream_id, info.width, info.height, info.fps or 30.0,
                                     tuple(sorted(s.ctrl.objects)), self.model.name, self.config.soft_masks,
                                     mask_kernel=publisher_mask_kernel(self.model, info.height, info.width))
            self._commands.append(c.OpenPublisher(stream_info, s.spec.sink_factory))
        elif isinstance(done, c.PublisherOpened):
            if done.errors:
                raise StreamError("; ".join(done.errors))
            s.state = "running"
        elif isinstance(done, c.FramesRead):
            s.reading = False
            self._admit(s, done.frames)
        elif isinstance(done, c.Encoded):
            s.ctrl.on_encoded(done.frame_idx, done.embedding)
        elif isinstance(done, c.FrameFailed):
            raise StreamError(f"frame {done.frame_idx}: {done.reason}")
        elif isinstance(done, c.StepDone):
            s.ctrl.on_step_done(done.key.object_id, done.frame_idx, done.result)
        elif isinstance(done, c.SnapshotTaken):
            s.ctrl.on_snapshot_done(done.tag, done.snapshot)
        elif isinstance(done, c.ObjectLost):
            self._event("object_recovered", s.spec.stream_id, f"object {done.key.object_id}: {done.reason}; "
                        "resuming from its snapshot")
            self._commands += s.ctrl.on_tracker_lost(done.key.object_id)
        elif isinstance(done, c.ObjectFailed):
            raise StreamError(f"object {done.key.object_id}: {done.reason}")
        elif isinstance(done, c.Published):
            self._on_published(s, done.ack)
        elif isinstance(done, c.PublisherClosed):
            for message in done.errors:
                s.outcome.sink_errors.append(message)
                self._event("sink_error", s.spec.stream_id, message)
            self._finish_stream(s)
        elif isinstance(done, c.StreamFailed):
            self._fail(s, done.reason)

    def _admit(self, s: _Stream, frames: tuple) -> None:
        if not frames:
            s.ctrl.end_input()
            return
        now = self.clock()
        for frame in frames:
            needs_encoding, dropped = s.ctrl.admit(frame.frame_idx, float(frame.pts), frame.rgb)
            self.stats.inc("masklet_frames_in_total", source_type=s.spec.source_type)
            s.admitted_at[frame.frame_idx] = now
            if dropped is not None:
                self.executor.cancel_frames(lambda sid, j, me=s.spec.stream_id, d=dropped: sid == me and j == d)
                self.stats.inc("masklet_frames_dropped_total", reason="queue_full")
                s.admitted_at.pop(dropped, None)
            if needs_encoding:
                self._commands.append(c.Encode(s.spec.stream_id, frame.frame_idx, frame.rgb))

    def _on_published(self, s: _Stream, ack: Any) -> None:
        s.in_flight -= 1
        s.ctrl.on_published()
        s.outcome.frames_published += 1
        admitted = s.admitted_at.pop(ack.frame_idx, None)
        if admitted is not None:
            self.stats.observe("masklet_end_to_end_latency_seconds", self.clock() - admitted)
        for message in ack.sink_errors:
            s.outcome.sink_errors.append(message)
            self._event("sink_error", s.spec.stream_id, message)
        self.on_progress(s.outcome)

    # -- endings ----------------------------------------------------------------------------

    def _release_objects(self, s: _Stream) -> list[Any]:
        return [c.CloseObject(s.ctrl.key(o.object_id)) for o in s.ctrl.objects.values() if o.created]

    def _close_stream(self, s: _Stream) -> None:
        s.state = "closing"
        self._commands += self._release_objects(s) + [c.CloseSource(s.spec.stream_id),
                                                      c.ClosePublisher(s.spec.stream_id)]

    def _finish_stream(self, s: _Stream) -> None:
        s.state = "done"
        s.outcome.finished = self.clock()
        self._event("stream_done", s.spec.stream_id, f"{s.outcome.frames_published} frames")
        self.stats.inc("masklet_active_streams", -1)

    def _fail(self, s: _Stream, reason: str) -> None:
        if s.state in ("done", "failed"):
            return
        s.state = "failed"
        s.outcome.error = reason
        s.outcome.finished = self.clock()
        self._event("stream_failed", s.spec.stream_id, reason)
        self.stats.inc("masklet_active_streams", -1)
        sid = s.spec.stream_id
        self.executor.cancel_frames(lambda other, _j: other == sid)
        # Close what was written so far (a partial video is still a valid file), release the objects.
        self._commands += self._release_objects(s) + [c.CloseSource(sid), c.ClosePublisher(sid)]

    def _event(self, kind: str, stream_id: str | None, message: str) -> None:
        event = EngineEvent(kind, stream_id, message)
        self.events.append(event)
        self.on_event(event)

    def _finish(self) -> RunReport:
        self.executor.submit(self._take_commands())  # closes of failed streams
        deadline = self.clock() + 30.0
        while self.executor.busy and self.clock() < deadline:
            for done in self.executor.poll(0.5, flush=True):
                if isinstance(done, c.PublisherClosed) and done.stream_id in self.streams:
                    s = self.streams[done.stream_id]
                    if s.state == "failed":
                        s.outcome.sink_errors += [m for m in done.errors if m not in s.outcome.sink_errors]
        report = self.executor.report()
        stats = merge([self.executor.stats_snapshot()])
        return RunReport({sid: s.outcome for sid, s in self.streams.items()}, self.events,
                         Counter(report["encoder_batch_sizes"]), stats, self.executor.encoder_restarts,
                         self.executor.tracker_restarts, Counter(report["tracker_batch_sizes"]), report["actors"])

    def shutdown(self) -> None:
        self.executor.shutdown()
