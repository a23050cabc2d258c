"""`masklet run`: consume frames + prompts, drive a `LiveSession`, publish masklet/v1 records.

    consumer (group) --records--> InputGate --frames/prompts--> LiveSession --outputs-->
        RecoveringProducer (masklets topic, key = stream id) --acks--> OffsetBook --> commit

Delivery is at-least-once: an input offset is committed only once everything it produced is
acknowledged. A frame is done when the record of its frame, or the record that reports its
drop (`LiveOutput.tokens`), is acked; a dead-lettered record is done when handed to the producer
(at most the dead letter itself may be lost on a crash); a prompt is done once a record of its
stream at or after its frame is acked, so a crash before the prompt took effect replays it.
`OffsetBook` commits, per partition, the lowest offset not yet done: offsets are committed
contiguously even though streams of one partition finish out of order.

Metrics: `self.stats` holds the runner's own counts (dead letters, frames refused before the
session, reconnects, `masklet_kafka_consumer_lag`); `stats_snapshot()` merges them with the
session's. Every consumed frame is counted once in `masklet_frames_in_total`: by the session when
submitted, by the runner when refused before that (dead-lettered, and counted as dropped with the
dead-letter reason), so frames in == published + dropped once a run has drained.
"""
from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from masklet.actors.payloads import ModelSpec
from masklet.monitoring.stats import Stats, StatsSnapshot, merge
from masklet.actors.backend import Backend
from masklet.pipeline.config import DEFAULT_MAX_PIXELS, KafkaSettings
from masklet.pipeline.kafka.client import consumer_kwargs, producer_kwargs
from masklet.pipeline.kafka.deadletter import DeadLetterPublisher, Rejected
from masklet.pipeline.kafka.fetch import FramesFetch
from masklet.pipeline.kafka.gate import AcceptedFrame, InputGate
from masklet.pipeline.kafka.offsets import TP, OffsetBook
from masklet.pipeline.kafka.producer import RecoveringProducer
from masklet.pipeline.kafka.resume import ObjectResumer, ResumeOutcome
from masklet.pipeline.live import LiveConfig, LiveOutput, LiveSession, PromptRejected
from masklet.actors.messages import PromptMessage

log = logging.getLogger(__name__)

# Session refusals -> the shared dead-letter reason codes (dashboards key on those).
_PROMPT_REASONS = {"unknown_stream": "unknown_stream", "frame_too_old": "out_of_order",
                   "not_latest_frame": "out_of_order"}


@dataclass(frozen=True)
class HeldPrompt:
    """A prompt whose stream has no frame on this member yet, and the record it came in."""

    deadline: float  # monotonic: dead-lettered as `unknown_stream` when no frame came by then
    prompt: PromptMessage
    record: Any

    @property
    def tp(self) -> TP:
        return (self.record.topic, self.record.partition)


@dataclass
class RunReport:
    frames: int = 0
    prompts: int = 0
    records: int = 0
    acked: int = 0
    dead_letters: int = 0
    commits: int = 0
    parked_restores: int = 0  # kafka-python work-around applied on resume (FramesFetch._restore_parked_records)
    streams: set = field(default_factory=set)
    resumed: list[ResumeOutcome] = field(default_factory=list)  # streams re-seeded from their last record

    def summary(self) -> str:
        objects = sum(len(r.prompts) for r in self.resumed)
        return (f"frames={self.frames} prompts={self.prompts} records={self.records} acked={self.acked} "
                f"dead_letters={self.dead_letters} commits={self.commits} parked_restores={self.parked_restores} "
                f"streams={len(self.streams)} resumed_objects={objects}")


class KafkaRunner:
    """One consumer-group member. `overload="drop"` (live default): frames go straight into the
    session, whose DROP_OLDEST queues drop and report what it cannot keep up with. `"pause"`: the
    runner holds frames (pausing the fetch) until the session has room, so nothing is dropped and
    the backlog stays in Kafka as consumer lag (archives, tests)."""

    def __init__(self, settings: KafkaSettings, backend: Backend, model: ModelSpec,
                 config: LiveConfig = LiveConfig(), *, overload: str = "drop", max_pixels: int = DEFAULT_MAX_PIXELS,
                 stats: Optional[Stats] = None, on_output: Optional[Callable[[LiveOutput], None]] = None,
                 commit_interval_s: float = 0.2, unknown_stream_hold_s: float = 30.0) -> None:
        if overload not in ("drop", "pause"):
            raise ValueError(f"overload must be 'drop' or 'pause', got {overload!r}")
        self.settings, self.overload, self.on_output = settings, overload, on_output
        self.commit_interval_s = commit_interval_s
        self.unknown_stream_hold_s = unknown_stream_hold_s
        self.stats = stats or Stats()
        self.report = RunReport()
        self.book = OffsetBook()
        self._acks: "queue.Queue[int]" = queue.Queue()
        self._by_seq: dict[int, tuple[tuple, str, int]] = {}
        self._prompt_waits: dict[str, list[tuple[int, TP, int]]] = {}
        self._held_prompts: dict[str, list[HeldPrompt]] = {}  # by stream id, oldest first
        self._backlog: deque[AcceptedFrame] = deque()
        self.session = LiveSession(backend, model, config)
        self.resumer: Optional[ObjectResumer] = ObjectResumer(settings) if settings.resume.enabled else None
        self.producer = RecoveringProducer(producer_kwargs(settings), stats=self.stats,
                                           on_ack=lambda seq, _meta: self._acks.put(seq))
        self.deadletters = DeadLetterPublisher(self.producer, settings.topics.deadletter, self.stats)
        self.gate = InputGate(self.deadletters, max_pixels, self.stats)
        kwargs = consumer_kwargs(settings, max_poll_records=max(4, config.queue_capacity))
        self.consumer = KafkaConsumer(**kwargs)
        self.consumer.subscribe([settings.topics.frames, settings.topics.prompts], listener=_Listener(self))
        self.fetch = FramesFetch(self.consumer, settings.topics.frames, self.report)
        self._last_commit = time.monotonic()

    # -- loop -------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool], idle_exit_s: Optional[float] = None) -> RunReport:
        idle_since = time.monotonic()
        try:
            while not should_stop():
                busy = self.step()
                if busy or self._backlog or any(self.session.status(s).lag_frames for s in self.session.streams()):
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s and not self.producer.unacked:
                    break
        finally:
            self.close()
        return self.report

    def step(self) -> bool:
        """One iteration: fetch, validate, submit, drive the session, publish, settle acks, commit."""
        if self.overload == "pause":
            self.fetch.pause_or_resume(full=len(self._backlog) >= self.session.config.queue_capacity)
        batch = self.consumer.poll(timeout_ms=10 if self.session.streams() else 200)
        for records in batch.values():
            for record in records:
                self._consume(record)
        self._feed_backlog()
        outputs = self.session.poll(0.0 if batch else 0.02)
        for out in outputs:
            self._publish(out)
        settled = self._settle_acks()
        self._expire_held_prompts()
        self._maybe_commit()
        self._update_lag()
        return bool(batch or outputs or settled)

    def stats_snapshot(self) -> StatsSnapshot:
        """The runner's metrics merged with its session's (still meaningful after `close()`)."""
        return merge([self.stats.snapshot(), self.session.stats_snapshot()])

    def _update_lag(self) -> None:
        """`masklet_kafka_consumer_lag` (see `FramesFetch.lag`)."""
        self.stats.set("masklet_kafka_consumer_lag", self.fetch.lag(self.book.positions()))

    # -- input ------------------------------------------------------------------------------

    def _consume(self, record: Any) -> None:
        tp = (record.topic, record.partition)
        self.book.consumed(tp, record.offset)
        if record.topic == self.settings.topics.frames:
            self.fetch.consumed(record)
            self.report.frames += 1
            frame = self.gate.frame(record)
            if frame is None or not self._open(frame, record):
                self._refused_frame()
                self._dead_lettered(tp, record.offset)
                return
            if self.overload == "pause":
                self._backlog.append(frame)
            else:
                self._submit(frame, record)
        else:
            self.report.prompts += 1
            prompt = self.gate.prompt(record)
            if prompt is None:
                self._dead_lettered(tp, record.offset)
            elif prompt.stream_id in self.session.streams():
                self._submit_prompt(prompt, record)
            else:
                # Its stream's first frame may simply not be here yet: after a restart or a rebalance
                # the prompts partition is often read first, and a replayed prompt must not be lost.
                held = HeldPrompt(time.monotonic() + self.unknown_stream_hold_s, prompt, record)
                self._held_prompts.setdefault(prompt.stream_id, []).append(held)

    def _submit_prompt(self, prompt: PromptMessage, record: Any) -> None:
        try:
            self.session.submit_prompt(prompt)
        except PromptRejected as exc:
            self._reject(Rejected(_PROMPT_REASONS.get(exc.reason, "malformed_prompt"), exc.reason, str(exc)), record)
            return
        tp = (record.topic, record.partition)
        self._prompt_waits.setdefault(prompt.stream_id, []).append((prompt.frame_idx, tp, record.offset))

    def _expire_held_prompts(self) -> None:
        now = time.monotonic()
        for stream_id, held in list(self._held_prompts.items()):
            while held and held[0].deadline <= now:
                self._reject(Rejected("unknown_stream", "unknown_stream",
                                      f"no frame of stream {stream_id!r} arrived within {self.unknown_stream_hold_s:g} s "
                                      f"of its prompt"), held.pop(0).record)
            if not held:
                del self._held_prompts[stream_id]

    def _open(self, frame: AcceptedFrame, record: Any) -> bool:
        if frame.stream_id in self.session.streams():
            return True
        try:
            self.session.open_stream(frame.stream_id, *frame.size, source_type="kafka")
        except ValueError as exc:  # max_streams reached
            self.deadletters.publish(Rejected("internal_error", "too_many_streams", str(exc)),
                                     source_topic=record.topic, payload=record.value, key=record.key,
                                     headers=record.headers, partition=record.partition, offset=record.offset)
            self.stats.inc("masklet_frames_dropped_total", reason="too_many_streams")
            return False
        self.report.streams.add(frame.stream_id)
        if self.resumer is not None:
            self._resume_objects(frame)
        for held in self._held_prompts.pop(frame.stream_id, []):
            if self.gate.recheck(held.prompt, held.record):  # after the resumed objects: the user's prompt wins
                self._submit_prompt(held.prompt, held.record)
            else:
                self._dead_lettered(held.tp, held.record.offset)
        return True

    def _resume_objects(self, frame: AcceptedFrame) -> None:
        """Re-add the objects of the stream's last record, as mask prompts held for this frame."""
        outcome = self.resumer.plan(frame.stream_id, frame.frame_idx)
        if outcome.source_frame_idx is None:
            return
        for prompt in outcome.prompts:
            try:
                self.session.submit_prompt(prompt)
            except PromptRejected as exc:  # e.g. a mask of another size: the stream starts without it
                log.warning("stream %s: object %d not resumed: %s", prompt.stream_id, prompt.object_id, exc)
        self.report.resumed.append(outcome)

    def _submit(self, frame: AcceptedFrame, record: Any = None) -> None:
        try:
            self.session.submit_frame(frame.stream_id, frame.frame_idx, frame.pts, frame.rgb,
                                      token=((frame.topic, frame.partition), frame.offset))
        except ValueError as exc:  # the stream's frame size changed mid-stream
            self.deadletters.publish(Rejected("bad_frame_headers", "size_changed", str(exc)),
                                     source_topic=frame.topic, payload=b"", key=frame.stream_id.encode(),
                                     partition=frame.partition, offset=frame.offset)
            self.stats.inc("masklet_frames_dropped_total", reason="bad_frame_headers")
            self._refused_frame()
            self._dead_lettered((frame.topic, frame.partition), frame.offset)

    def _feed_backlog(self) -> None:
        blocked: set[str] = set()
        kept: deque[AcceptedFrame] = deque()
        while self._backlog:
            frame = self._backlog.popleft()
            if frame.stream_id in blocked or self.session.queue_room(frame.stream_id) < 1:
                blocked.add(frame.stream_id)  # keep this stream's order: nothing after it goes first
                kept.append(frame)
            else:
                self._submit(frame)
        self._backlog = kept

    def _refused_frame(self) -> None:
        """A frame dead-lettered before the session took it (which counts the frames it takes):
        count it in here; whoever refused it counted the drop, with the dead-letter reason."""
        self.stats.inc("masklet_frames_in_total", source_type="kafka")

    def _reject(self, rejected: Rejected, record: Any) -> None:
        self.deadletters.publish(rejected, source_topic=record.topic, payload=record.value, key=record.key,
                                 headers=record.headers, partition=record.partition, offset=record.offset)
        self._dead_lettered((record.topic, record.partition), record.offset)

    def _dead_lettered(self, tp: TP, offset: int) -> None:
        self.report.dead_letters += 1
        self.book.done(tp, offset)

    # -- output -----------------------------------------------------------------------------

    def _publish(self, out: LiveOutput) -> None:
        rec = out.record
        seq = self.producer.send(self.settings.topics.masklets, value=rec.to_json_bytes(), key=rec.kafka_key(),
                                 headers=[("schema", rec.schema_version.encode())])
        self._by_seq[seq] = (out.tokens, rec.stream_id, rec.frame_idx)
        self.report.records += 1
        if self.on_output is not None:
            self.on_output(out)

    def _settle_acks(self) -> int:
        count = 0
        while True:
            try:
                seq = self._acks.get_nowait()
            except queue.Empty:
                return count
            entry = self._by_seq.pop(seq, None)
            if entry is None:
                continue  # a dead letter
            count += 1
            self.report.acked += 1
            tokens, stream_id, frame_idx = entry
            for tp, offset in tokens:
                self.book.done(tp, offset)
            waits = self._prompt_waits.get(stream_id, [])
            for wait in [w for w in waits if w[0] <= frame_idx]:
                self.book.done(wait[1], wait[2])
                waits.remove(wait)

    def _maybe_commit(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_commit < self.commit_interval_s:
            return
        self._last_commit = time.monotonic()
        positions = self.book.to_commit()
        if not positions:
            return
        try:
            self.consumer.commit({TopicPartition(t, p): OffsetAndMetadata(pos, "", -1)
                                  for (t, p), pos in positions.items()})
        except Exception as exc:  # noqa: BLE001 - a failed commit only means more replay after a crash
            log.warning("offset commit failed (%s); will retry", exc)
            return
        self.book.committed(positions)
        self.report.commits += 1

    def close(self) -> None:
        """Flush what was published, commit what it settled, leave the group, release the actors."""
        try:
            self.producer.flush(10.0)
            self._settle_acks()
            self._maybe_commit(force=True)
        except Exception as exc:  # noqa: BLE001 - closing must go on; uncommitted input is replayed
            log.warning("final flush/commit failed: %s", exc)
        finally:
            self.consumer.close()
            if self.resumer is not None:
                self.resumer.close()
            self.producer.close(timeout=5.0)
            self.session.shutdown()


class _Listener(ConsumerRebalanceListener):
    """Commit what is done before partitions move to another member; forget revoked partitions."""

    def __init__(self, runner: KafkaRunner) -> None:
        self.runner = runner

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.runner._settle_acks()
        self.runner._maybe_commit(force=True)
        self.runner.book.forget([(tp.topic, tp.partition) for tp in revoked])
        gone = {(tp.topic, tp.partition) for tp in revoked}
        for stream_id, held in list(self.runner._held_prompts.items()):  # their new owner reads them again
            held[:] = [h for h in held if h.tp not in gone]
            if not held:
                del self.runner._held_prompts[stream_id]
        self.runner.fetch.forget(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        pass
