"""The one execution core behind both schedulers (files and live streams).

A scheduler hands over plain commands (`pipeline.commands`) and gets completions back. The
executor owns everything the two used to repeat:

  * encoder batching across streams (`DynamicBatcher`, `max_batch_size`/`max_wait_ms`), a bounded
    number of batches in flight, and encoder restarts (in-flight frames are re-queued in order;
    past `max_encoder_restarts` they fail);
  * placement: streams on decoder and publisher actors, objects on tracker actors
    (`pipeline.placement`), processes reused across inputs and streams;
  * batching of tracker work: every op for one tracker actor in one round goes out as ONE `run`
    call, interleaved object by object so the actor can step distinct objects together;
  * recovery: a dead tracker actor loses its objects, each reported as `ObjectLost` (the scheduler
    reopens it from its snapshot, anywhere, and replays); completions of ops submitted before the
    loss are discarded (each object has an epoch). A dead decoder or publisher fails its file
    streams; for live streams (`restartable`) it is replaced and in-flight work resubmitted;
  * stats: the executor's own, every actor's, and the last ones of actors that are gone.

The executor keeps no pixels: it forwards references (Ray object refs, or values in-process) and
reads only the small status tuples the actors return first.
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from masklet.actors import tracker as tk
from masklet.actors.backend import ActorCallError, ActorDiedError, ActorHandle, ActorOptions, Backend
from masklet.actors.decoder import DecoderActor
from masklet.actors.encoder import EncoderActor
from masklet.actors.payloads import ArgLayout, ModelSpec, PackedResult
from masklet.actors.publisher import PublisherActor, publish_frames_args
from masklet.actors.shard import FrameKey, ShardActor
from masklet.actors.tracker import ObjectKey, TrackerActor
from masklet.monitoring.stats import Stats, StatsSnapshot, merge
from masklet.pipeline import commands as c
from masklet.pipeline.batching import DynamicBatcher
from masklet.pipeline.executor_config import ExecutorConfig
from masklet.pipeline.executor_done import complete
from masklet.pipeline.placement import ActorPool

__all__ = ["Executor", "ExecutorConfig"]


@dataclass
class _Call:
    kind: str
    actor: Optional[ActorHandle]
    generation: int
    payload: Any = None


@dataclass
class _TrackerBatch:
    """Ops for one tracker actor, gathered during one `submit`."""

    actor: ActorHandle
    per_object: dict[ObjectKey, list] = field(default_factory=lambda: defaultdict(list))


class Executor:
    def __init__(self, backend: Backend, model: ModelSpec, config: ExecutorConfig = ExecutorConfig(), *,
                 clock: Callable[[], float] = time.monotonic,
                 on_event: Optional[Callable[[c.ExecutorEvent], None]] = None) -> None:
        self.backend, self.model, self.config, self.clock = backend, model, config, clock
        self.on_event = on_event
        self.stats = Stats()
        self.events: deque[c.ExecutorEvent] = deque(maxlen=500)
        self.batcher: DynamicBatcher = DynamicBatcher(config.max_batch_size, config.max_wait_ms)
        self.encoder: Optional[ActorHandle] = None
        self.encoder_restarts = self.tracker_restarts = 0
        # A colocated shard hosts every object itself: one "tracker" actor, which is the encoder.
        capacity = 1 << 30 if config.colocate else config.objects_per_tracker
        self.trackers: ActorPool[ObjectKey] = ActorPool("tracker", self._spawn_tracker, capacity)
        self.decoders: ActorPool[str] = ActorPool("decoder", self._spawn_decoder, config.streams_per_decoder)
        self.publishers: ActorPool[str] = ActorPool("publisher", self._spawn_publisher, config.streams_per_publisher,
                                                    spread_first=config.publishers_before_sharing)
        self._pending: dict[Any, _Call] = {}
        self._encoding: list[tuple[int, list, Any]] = []      # (encoder generation, jobs, status future)
        self._epoch: dict[ObjectKey, int] = defaultdict(int)
        self._restartable: set[str] = set()                   # live streams: publishers/decoders are replaced
        self._publisher_info: dict[str, c.OpenPublisher] = {}
        self._ready: list[Any] = []                            # completions made without waiting
        self._enqueued: dict[tuple[str, int], float] = {}      # encoder queue entry times, for the queue stage
        self._retired: list[StatsSnapshot] = []
        self._shut = False

    # -- actors ---------------------------------------------------------------------------------

    def _threads(self, cap: Optional[int]) -> Optional[int]:
        # In-process "actors" share this process: capping threads there would change the caller's own
        # torch thread count (and with it float reduction order), so caps apply to real actors only.
        return cap if self.backend.separate_processes else None

    def start(self) -> ActorHandle:
        """Start the encoder now (it loads the model: seconds), instead of on the first frame."""
        if self.encoder is not None:
            return self.encoder
        cfg = self.config
        if cfg.colocate:
            self.encoder = self.backend.spawn(
                "shard", ShardActor, self.model, self._threads(cfg.encoder_threads), cfg.shard_cache_frames,
                cfg.max_batch_size, options=ActorOptions(num_cpus=0, num_gpus=cfg.encoder_gpus + cfg.tracker_gpus,
                                                         resources=cfg.encoder_resources))
        else:
            self.encoder = self.backend.spawn(
                "encoder", EncoderActor, self.model, self._threads(cfg.encoder_threads),
                options=ActorOptions(num_cpus=0, num_gpus=cfg.encoder_gpus, resources=cfg.encoder_resources))
        if self.backend.separate_processes:
            # One of each stage starts now, side by side: otherwise each starts only once the stage
            # before it has produced something, and their start-ups add up.
            for pool in (self.decoders, self.publishers) + (() if cfg.colocate else (self.trackers,)):
                pool.warm()
        return self.encoder

    def _spawn_tracker(self, name: str) -> ActorHandle:
        if self.config.colocate:
            return self.start()
        cfg = self.config
        self.stats.set("masklet_tracker_actors", len(self.trackers.actors) + 1)
        return self.backend.spawn(name, TrackerActor, self.model, self._threads(cfg.tracker_threads),
                                  max_step_batch=cfg.max_step_batch, options=ActorOptions(num_gpus=cfg.tracker_gpus, resources=cfg.tracker_resources,
                                                       spread=cfg.spread))

    def _spawn_decoder(self, name: str) -> ActorHandle:
        return self.backend.spawn(name, DecoderActor, self._threads(1), self.config.max_pixels,
                                  options=ActorOptions(resources=self.config.io_resources))

    def _spawn_publisher(self, name: str) -> ActorHandle:
        return self.backend.spawn(name, PublisherActor, self._threads(1),
                                  options=ActorOptions(resources=self.config.io_resources))

    # -- submit ---------------------------------------------------------------------------------

    def submit(self, commands: Iterable[Any]) -> None:
        """Dispatch one round of commands; tracker ops leave as one `run` call per tracker actor."""
        batches: dict[str, _TrackerBatch] = {}
        decodes: dict[str, tuple[ActorHandle, list]] = {}
        publishes: dict[str, list] = {}
        for cmd in commands:
            if isinstance(cmd, (c.OpenObject, c.Step, c.Refine, c.BranchBackward, c.Snapshot, c.CloseObject)):
                self._add_tracker_op(cmd, batches)
            elif isinstance(cmd, c.Encode) and self.config.colocate:
                # The shard encodes the frame when an op first needs it, batched with the call's others.
                self._ready.append(c.Encoded(cmd.stream_id, cmd.frame_idx,
                                             c.DeferredEmbedding(cmd.stream_id, cmd.frame_idx, cmd.rgb)))
            elif isinstance(cmd, c.Encode):
                self.start()
                now = self.clock()
                self._enqueued[(cmd.stream_id, cmd.frame_idx)] = now
                self.batcher.add((cmd.stream_id, cmd.frame_idx, cmd.rgb), now)
            elif isinstance(cmd, c.DecodeImage):
                self._restartable.add(cmd.stream_id)
                actor = self.decoders.place(cmd.stream_id)
                decodes.setdefault(actor.name, (actor, []))[1].append(cmd)
            elif isinstance(cmd, c.Publish):
                publishes.setdefault(cmd.meta.stream_id, []).append(cmd)
            else:
                self._submit_io(cmd)
        for batch in batches.values():
            self._send_tracker_batch(batch)
        for actor, cmds in decodes.values():
            self._send_decodes(actor, cmds)
        for sid, cmds in publishes.items():
            self._send_publishes(sid, cmds)

    def _call(self, kind: str, actor: ActorHandle, method: str, *args: Any, payload: Any = None,
              num_returns: int = 1) -> Any:
        out = self.backend.call(actor, method, *args, num_returns=num_returns)
        first = out[0] if num_returns > 1 else out
        self._pending[first] = _Call(kind, actor, actor.generation, payload)
        return out

    def _submit_io(self, cmd: Any) -> None:
        if isinstance(cmd, c.OpenSource):
            self._call("open_source", self.decoders.place(cmd.stream_id), "open", cmd.stream_id, cmd.opener,
                       payload=cmd)
        elif isinstance(cmd, c.ReadFrames):
            actor = self.decoders.actor_of(cmd.stream_id)
            if actor is not None:
                out = self._call("read", actor, "read", cmd.stream_id, cmd.max_frames, payload=cmd, num_returns=2)
                self._pending[out[0]].payload = (cmd, out[1])
        elif isinstance(cmd, c.CloseSource):
            actor = self.decoders.actor_of(cmd.stream_id)
            if actor is not None:
                self.backend.call(actor, "close", cmd.stream_id)
                self.decoders.release(cmd.stream_id)
        elif isinstance(cmd, c.OpenPublisher):
            sid = cmd.info.stream_id
            if cmd.info.return_records:
                self._restartable.add(sid)
            self._publisher_info[sid] = cmd
            self._call("publisher_open", self.publishers.place(sid), "open", cmd.info, cmd.sink_factory, payload=cmd)
        elif isinstance(cmd, c.ClosePublisher):
            actor = self.publishers.actor_of(cmd.stream_id)
            self._publisher_info.pop(cmd.stream_id, None)
            self._restartable.discard(cmd.stream_id)
            if actor is None:
                self._ready.append(c.PublisherClosed(cmd.stream_id, ()))
            else:
                self._call("publisher_close", actor, "close", cmd.stream_id, payload=cmd)
                self.publishers.release(cmd.stream_id)
        else:  # pragma: no cover - a scheduler/executor mismatch is a bug
            raise TypeError(f"unknown command {cmd!r}")

    def _add_tracker_op(self, cmd: Any, batches: dict[str, _TrackerBatch]) -> None:
        key = cmd.key
        if isinstance(cmd, c.OpenObject):
            self._epoch[key] += 1
            actor = self.trackers.place(key, group=key.stream_id)
        else:
            actor = self.trackers.actor_of(key)
            if actor is None:
                return  # lost (ObjectLost is on its way) or closed: the scheduler replays or has moved on
        batch = batches.setdefault(actor.name, _TrackerBatch(actor))
        batch.per_object[key].append((cmd, self._epoch[key]))
        if isinstance(cmd, c.CloseObject):
            self.trackers.release(key)
            self._epoch.pop(key, None)

    def _send_tracker_batch(self, batch: _TrackerBatch) -> None:
        """Interleave the objects' op lists (1st op of each, then 2nd, ...) so consecutive steps of
        distinct objects batch in the actor, while each object keeps its own order."""
        queues = [deque(ops) for ops in batch.per_object.values()]
        ordered: list[tuple[Any, int]] = []
        while queues:
            for q in queues:
                ordered.append(q.popleft())
            queues = [q for q in queues if q]
        layout = ArgLayout()  # one argument per distinct snapshot, embedding pack or frame key
        frame_keys: dict[int, FrameKey] = {}

        def arg(value: Any) -> Any:  # what the actor receives: a deferred embedding is its frame's key
            if not isinstance(value, c.DeferredEmbedding):
                return value
            if id(value) not in frame_keys:  # its pixels travel as an argument of their own
                frame_keys[id(value)] = FrameKey(value.stream_id, value.frame_idx, layout.pick(value.rgb))
            return frame_keys[id(value)]

        def ref(value: Any) -> int:
            return layout.slot(arg(value))

        def pick(value: Any) -> tuple[int, Optional[int]]:
            return layout.pick(arg(value))

        ops = []
        for cmd, _ in ordered:
            if isinstance(cmd, c.OpenObject):
                ops.append(tk.OpenObject(cmd.key, cmd.video_size, cmd.num_frames,
                                         -1 if cmd.snapshot is None else ref(cmd.snapshot)))
            elif isinstance(cmd, c.Step):
                ops.append(tk.StepObject(cmd.key, cmd.direction, cmd.frame_idx, pick(cmd.embedding), cmd.prompt))
            elif isinstance(cmd, c.Refine):
                ops.append(tk.RefineObject(cmd.key, pick(cmd.embedding), cmd.prompt))
            elif isinstance(cmd, c.BranchBackward):
                ops.append(tk.BranchBackward(cmd.key))
            elif isinstance(cmd, c.Snapshot):
                ops.append(tk.SnapshotObject(cmd.key))
            else:
                ops.append(tk.CloseObject(cmd.key))
        count, where = tk.return_layout(ops)
        out = self._call("run", batch.actor, "run", ops, *layout.values, num_returns=count)
        out = out if count > 1 else [out]
        values = [None] * len(ops)
        for i, (slot, index) in where.items():
            values[i] = out[slot] if index is None else PackedResult(out[slot], index)
        self._pending[out[0]].payload = (ordered, values)

    def _send_publishes(self, stream_id: str, cmds: list) -> None:
        """A round's frames of one stream in one call, in order (a call per frame cost the driver and
        raylet more than publishing did). Per stream, so a failing call fails only its own stream."""
        actor = self.publishers.actor_of(stream_id)
        if actor is not None:
            frames, values = publish_frames_args([(cmd.meta, cmd.rgb, cmd.results) for cmd in cmds])
            self._call("publish", actor, "publish_frames", frames, *values, payload=tuple(cmds))

    def _send_decodes(self, actor: ActorHandle, cmds: list) -> None:
        out = self._call("decode", actor, "decode", *[cmd.image for cmd in cmds], num_returns=len(cmds) + 1)
        self._pending[out[0]].payload = (cmds, out[1:])

    def cancel_frames(self, predicate: Callable[[str, int], bool]) -> int:
        """Forget queued (not yet sent) encoder work, e.g. a frame dropped under DROP_OLDEST."""
        for key in [k for k in self._enqueued if predicate(*k)]:
            del self._enqueued[key]
        return self.batcher.remove(lambda job: predicate(job[0], job[1]))

    # -- encoder batches ------------------------------------------------------------------------

    def _release_batches(self, flush: bool) -> None:
        if self.encoder is None:
            return
        now = self.clock()
        while self._encoder_room():
            jobs = self.batcher.next_batch(now, flush=flush)
            if jobs is None:
                break
            for sid, j, _ in jobs:
                queued = self._enqueued.pop((sid, j), now)
                self.stats.observe("masklet_stage_latency_seconds", now - queued, stage="queue")
            by_stream: dict[str, list] = {}  # one embedding pack per stream (actors.encoder)
            for job in jobs:
                by_stream.setdefault(job[0], []).append(job)
            jobs = [job for group in by_stream.values() for job in group]
            layout = ArgLayout()  # a decoder read's pack is one argument for all of its frames
            groups = tuple(layout.picks([rgb for _, _, rgb in group]) for group in by_stream.values())
            out = self._call("encode", self.encoder, "encode", groups, *layout.values, num_returns=len(groups) + 1)
            embeddings = [PackedResult(out[1 + g], i) for g, group in enumerate(by_stream.values())
                          for i in range(len(group))]
            self._pending[out[0]].payload = (jobs, embeddings)
            self._encoding.append((self.encoder.generation, jobs, out[0]))

    def _encoder_room(self) -> bool:
        live = sum(1 for g, _, _ in self._encoding if g == self.encoder.generation)
        return live < self.config.encoder_queue_depth

    def next_deadline(self) -> Optional[float]:
        """When a partial encoder batch must go, if the encoder could take it (for a loop's sleep)."""
        if self.encoder is None or not self._encoder_room():
            return None
        return self.batcher.deadline()

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._ready or len(self.batcher))

    # -- wait and complete ----------------------------------------------------------------------

    def poll(self, timeout: float = 0.0, *, flush: bool = False) -> list[Any]:
        """Release due encoder batches, wait up to `timeout` (less if a batch deadline comes first,
        nothing if completions are already there) and return every completion that is ready."""
        self._release_batches(flush)
        out, self._ready = self._ready, []
        wait_s = 0.0 if out else max(0.0, timeout)
        deadline = self.next_deadline()
        if deadline is not None:
            wait_s = min(wait_s, max(0.0, deadline - self.clock()))
        if self._pending:
            ready, _ = self.backend.wait(list(self._pending), wait_s)
            for future in ready:
                call = self._pending.pop(future, None)
                if call is not None:
                    complete(self, future, call, out)
        elif wait_s > 0:
            time.sleep(wait_s)
        self._release_batches(flush)
        out += self._ready
        self._ready = []
        return out

    def event(self, kind: str, stream_id: Optional[str], message: str) -> None:
        ev = c.ExecutorEvent(kind, stream_id, message)
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    # -- stats and shutdown ---------------------------------------------------------------------

    def all_actors(self) -> list[ActorHandle]:
        actors = ([] if self.encoder is None else [self.encoder]) + self.trackers.actors + self.decoders.actors \
            + self.publishers.actors
        return list({id(a): a for a in actors}.values())  # a colocated shard is encoder and tracker

    def stats_snapshot(self) -> StatsSnapshot:
        snaps = [self.stats.snapshot(), *self._retired]
        if not self._shut:
            futures = [(a, self.backend.call(a, "stats_snapshot")) for a in self.all_actors()]
            for _, f in futures:
                try:
                    snaps.append(self.backend.get(f))
                except (ActorDiedError, ActorCallError):
                    pass
        return merge(snaps)

    def report(self) -> dict:
        """Batch sizes and where every actor runs (tests and benchmarks read this)."""
        out: dict[str, Any] = {"encoder_batch_sizes": {}, "tracker_batch_sizes": {}, "actors": {}}
        if self.encoder is not None:
            try:
                rep = self.backend.get(self.backend.call(self.encoder, "report"))
                out["encoder_batch_sizes"] = dict(rep["encoder_batch_sizes" if self.config.colocate else "batch_sizes"])
            except (ActorDiedError, ActorCallError):
                pass
        for pool in (self.trackers, self.decoders, self.publishers):
            for actor in pool.actors:
                try:
                    rep = self.backend.get(self.backend.call(actor, "report"))
                except (ActorDiedError, ActorCallError):
                    continue
                out["actors"][actor.name] = rep
                for size, n in rep.get("batch_sizes", {}).items():
                    out["tracker_batch_sizes"][size] = out["tracker_batch_sizes"].get(size, 0) + n
        return out

    def retire(self, actor: ActorHandle) -> None:
        try:
            self._retired.append(self.backend.get(self.backend.call(actor, "stats_snapshot")))
        except (ActorDiedError, ActorCallError):
            pass
        self.backend.kill(actor)

    def shutdown(self) -> None:
        if self._shut:
            return
        for actor in self.all_actors():
            self.retire(actor)
        self._shut = True
        self.encoder = None
