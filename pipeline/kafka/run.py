"""`masklet run`: consume frames + prompts, drive a `LiveSession`, publish masklet/v1 records.

    consumer (group) --records--> Intake (cross-topic order, forwarding, InputGate, reorder)
        --frames/prompts--> LiveSession (its own driver thread) --outputs--> Publisher (its own
        thread) --> RecoveringProducer (masklets topic, key = stream id) --acks--> OffsetBook --> commit

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
dead-letter reason), so frames in == published + dropped once a run has drained. Frames the
broker lost never arrive: they are counted in `masklet_frames_lost_total` and reported in the next
record (`lost_frames_since_last`), so frames sent == published + dropped + lost.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.structs import OffsetAndMetadata

from masklet.actors.backend import Backend
from masklet.actors.payloads import ModelSpec
from masklet.monitoring.stats import Stats, StatsSnapshot, merge
from masklet.pipeline.config import DEFAULT_MAX_PIXELS, KafkaSettings
from masklet.pipeline.kafka.client import consumer_kwargs, producer_kwargs, profile_of
from masklet.pipeline.kafka.deadletter import DeadLetterPublisher, Rejected
from masklet.pipeline.kafka.fetch import FramesFetch
from masklet.pipeline.kafka.gate import InputGate
from masklet.pipeline.kafka.intake import HeldPrompt, Intake  # noqa: F401 (HeldPrompt re-exported)
from masklet.pipeline.kafka.offsets import TP, OffsetBook
from masklet.pipeline.kafka.order import PromptOrder
from masklet.pipeline.kafka.producer import RecoveringProducer
from masklet.pipeline.kafka.publish import Publisher
from masklet.pipeline.kafka.reorder import FrameReorder, Release
from masklet.pipeline.kafka.reroute import Rerouter
from masklet.pipeline.kafka.resume import ObjectResumer, ResumeOutcome
from masklet.pipeline.live import LiveConfig, LiveOutput, LiveSession

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    frames: int = 0
    prompts: int = 0
    records: int = 0
    acked: int = 0
    dead_letters: int = 0
    commits: int = 0
    parked_restores: int = 0  # kafka-python work-around applied on resume (FramesFetch._restore_parked_records)
    fetch_wait_changes: int = 0  # switches between the profile's fetch waits (FramesFetch.set_fetch_wait)
    forwarded: int = 0        # records moved to their stream's home partition (reroute.py)
    lost_frames: int = 0      # frames missing from their stream after the reorder window
    lost: dict = field(default_factory=dict)   # stream id -> [(first, last), ...] lost frame indices
    streams: set = field(default_factory=set)
    resumed: list[ResumeOutcome] = field(default_factory=list)  # streams re-seeded from their last record

    def summary(self) -> str:
        objects = sum(len(r.prompts) for r in self.resumed)
        return (f"frames={self.frames} prompts={self.prompts} records={self.records} acked={self.acked} "
                f"dead_letters={self.dead_letters} commits={self.commits} parked_restores={self.parked_restores} "
                f"forwarded={self.forwarded} lost_frames={self.lost_frames} "
                f"streams={len(self.streams)} resumed_objects={objects}")


class KafkaRunner:
    """One consumer-group member. `overload="drop"` (live default): frames go straight into the
    session, whose DROP_OLDEST queues drop and report what it cannot keep up with. `"pause"`: the
    runner holds frames (pausing the fetch) until the session has room, so nothing is dropped and
    the backlog stays in Kafka as consumer lag (archives, tests)."""

    def __init__(self, settings: KafkaSettings, backend: Backend, model: ModelSpec,
                 config: LiveConfig = LiveConfig(), *, overload: str = "drop", max_pixels: int = DEFAULT_MAX_PIXELS,
                 stats: Optional[Stats] = None, on_output: Optional[Callable[[LiveOutput], None]] = None,
                 commit_interval_s: Optional[float] = None, unknown_stream_hold_s: float = 30.0,
                 limits: Any = None) -> None:
        if overload not in ("drop", "pause"):
            raise ValueError(f"overload must be 'drop' or 'pause', got {overload!r}")
        self.settings, self.overload = settings, overload
        self.profile = profile_of(settings)
        self.commit_interval_s = self.profile.commit_interval_s if commit_interval_s is None else commit_interval_s
        self.unknown_stream_hold_s = unknown_stream_hold_s
        self.stats = stats or Stats()
        self.report = RunReport()
        self.book = OffsetBook()
        self.producer = RecoveringProducer(producer_kwargs(settings), stats=self.stats,
                                           on_ack=lambda seq, _meta: self.publisher.acked(seq))
        self.publisher = Publisher(self.producer, settings.topics.masklets, on_output=on_output)
        self.session = LiveSession(backend, model, config, on_output=self.publisher.submit)
        self.resumer: Optional[ObjectResumer] = ObjectResumer(settings) if settings.resume.enabled else None
        self.deadletters = DeadLetterPublisher(self.producer, settings.topics.deadletter, self.stats)
        limits = limits if limits is not None else getattr(config, "limits", None)  # the session's caps
        gate_kw = {} if limits is None else {"limits": limits}
        self.gate = InputGate(self.deadletters, max_pixels, self.stats, **gate_kw)
        # Co-partitioned topics and the range assignor: a member that owns frames partition i owns
        # prompts partition i too, so a stream's frames can wait for its prompts (order.py).
        self.consumer = KafkaConsumer(**consumer_kwargs(
            settings, max_poll_records=max(16, 2 * config.queue_capacity),
            partition_assignment_strategy=(RangePartitionAssignor,)))
        self.consumer.subscribe([settings.topics.frames, settings.topics.prompts], listener=_Listener(self))
        self.fetch = FramesFetch(self.consumer, settings.topics.frames, self.report)
        self._dropped_seen: dict[str, int] = {}  # per stream, frames_dropped at the last `_behind`
        live = settings.live
        self.order = PromptOrder(self.consumer, max_wait_s=live.prompt_wait_ms / 1000, stats=self.stats)
        max_gap = getattr(limits, "max_frame_gap", 100_000)
        self.reorder = FrameReorder(live.reorder_window_ms / 1000, live.reorder_window_frames, max_gap)
        self.rerouter = Rerouter(self.consumer, self.stats)
        self.intake = Intake(self)
        self._last_commit = self._last_record_at = time.monotonic()
        self.session.start()  # its own driver thread: model work never waits for a Kafka poll

    # -- loop -------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool], idle_exit_s: Optional[float] = None) -> RunReport:
        idle_since = time.monotonic()
        try:
            while not should_stop():
                if self.step() or not self._drained():
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
        finally:
            self.close()
        return self.report

    def _drained(self) -> bool:
        return (not self.intake.buffered() and self.publisher.idle() and not self.producer.unacked
                and not any(self.session.status(s).lag_frames for s in self.intake.streams))

    def step(self) -> bool:
        """One iteration: fetch, order, validate, submit; settle acks, commit (the session and the
        publisher run in their own threads)."""
        if self.publisher.error is not None:
            raise self.publisher.error
        capacity = self.session.config.queue_capacity
        if self.overload == "pause":
            self.fetch.pause_or_resume(full=self.intake.buffered() >= capacity)
        self.fetch.set_fetch_wait(self._fetch_wait_ms(capacity))
        batch = self.consumer.poll(timeout_ms=self._poll_timeout_ms())
        records = [record for records in batch.values() for record in records]
        for record in records:  # prompts first: a frame of this batch must not overtake them
            if record.topic != self.settings.topics.frames:
                self.intake.prompt_record(record)
        for record in records:
            if record.topic == self.settings.topics.frames:
                self.intake.frame_record(record)
        room = max(0, capacity - len(self.intake.backlog) - self.reorder.held()) if self.overload == "pause" else None
        released = self.order.release(room, blocked=self.publisher.prompts_in_flight())
        for record in released:
            self.intake.released(record)
        for outcome in self.reorder.expire():
            self.intake.go(outcome)
        self.intake.feed_backlog()
        self._dead_letter_failures()
        settled = self._settle()
        self.intake.expire_held_prompts()
        self._maybe_commit()
        self._update_lag()
        if records:  # after handling them: a slow step (a stream's resume scan) is not idle time
            self._last_record_at = time.monotonic()
        return bool(records or released or settled)

    def _fetch_wait_ms(self, capacity: int) -> int:
        """The broker's hold on our next fetches: short while live, longer while the session is behind
        (`_behind`) and while the run is idle (no record for `idle_after_s`, nothing in flight)."""
        if self._behind(capacity):
            return self.profile.busy_fetch_max_wait_ms
        if time.monotonic() - self._last_record_at > self.profile.idle_after_s and self._drained():
            return max(self.profile.fetch_max_wait_ms, self.profile.idle_fetch_max_wait_ms)
        return self.profile.fetch_max_wait_ms

    def _behind(self, capacity: int) -> bool:
        """A stream's queue is full, or it dropped a frame since the last look: the session, not the
        fetch, sets the pace."""
        behind, seen, self._dropped_seen = False, self._dropped_seen, {}  # streams that closed drop out
        for stream_id in self.intake.streams:
            status = self.session.status(stream_id)
            self._dropped_seen[stream_id] = status.frames_dropped
            behind = behind or status.lag_frames >= capacity or status.frames_dropped > seen.get(stream_id, 0)
        return behind

    def _poll_timeout_ms(self) -> int:
        if not self.intake.streams and not self.order.waiting():
            return 200
        timeout = self.profile.poll_timeout_ms
        if self.order.waiting() or self.reorder.held():
            # Re-check soon: the next fetch response (within fetch_max_wait_ms) may settle the wait.
            timeout = min(timeout, self.profile.fetch_max_wait_ms)
        return max(1, timeout)

    def stats_snapshot(self) -> StatsSnapshot:
        """The runner's metrics merged with its session's (still meaningful after `close()`)."""
        return merge([self.stats.snapshot(), self.session.stats_snapshot()])

    def _update_lag(self) -> None:
        """`masklet_kafka_consumer_lag` (see `FramesFetch.lag`)."""
        self.stats.set("masklet_kafka_consumer_lag", self.fetch.lag(self.book.positions()))

    # -- shared with Intake -----------------------------------------------------------------

    def resume_objects(self, outcome: ResumeOutcome) -> None:
        """Re-add the objects of the stream's last record, as mask prompts held for its first frame."""
        from masklet.pipeline.live import PromptRejected

        if outcome.source_frame_idx is None:
            return
        for prompt in outcome.prompts:
            try:
                self.session.submit_prompt(prompt)
            except PromptRejected as exc:  # e.g. a mask of another size: the stream starts without it
                log.warning("stream %s: object %d not resumed: %s", prompt.stream_id, prompt.object_id, exc)
        self.report.resumed.append(outcome)

    def report_lost(self, stream_id: str, release: Release) -> None:
        """Frames missing from a stream after the reorder window: counted, named, and reported."""
        self.report.lost_frames += release.lost_before
        self.report.lost.setdefault(stream_id, []).extend(release.lost_ranges)
        self.stats.inc("masklet_frames_lost_total", release.lost_before)
        ranges = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in release.lost_ranges)
        log.warning("stream %s: %d frames lost before frame %d (never arrived within the reorder window): %s",
                    stream_id, release.lost_before, release.frame.frame_idx, ranges)

    def reject(self, rejected: Rejected, record: Any) -> None:
        self.deadletters.publish(rejected, source_topic=record.topic, payload=record.value, key=record.key,
                                 headers=record.headers, partition=record.partition, offset=record.offset)
        self.dead_lettered((record.topic, record.partition), record.offset)

    def dead_lettered(self, tp: TP, offset: int) -> None:
        self.report.dead_letters += 1
        self.book.done(tp, offset)

    # -- output -----------------------------------------------------------------------------

    def _dead_letter_failures(self) -> None:
        """Outputs without a record: the session could not decode the frame (`LiveOutput.failure`)."""
        while not self.publisher.failures.empty():
            out = self.publisher.failures.get_nowait()
            for (topic, partition), offset in out.tokens:
                self.deadletters.publish(Rejected("undecodable_frame", "decode_failed", str(out.failure)),
                                         source_topic=topic, payload=b"", partition=partition, offset=offset)
                self.dead_lettered((topic, partition), offset)

    def _settle(self) -> int:
        settled = self.publisher.settled()
        for settle in settled:
            for tp, offset in settle.tokens:
                self.book.done(tp, offset)
            if settle.stream_id is not None:
                self.report.acked += 1
                self.intake.settle_prompts(settle.stream_id, settle.frame_idx)
        self.report.records = self.publisher.records
        self.report.forwarded = self.rerouter.forwarded
        return len(settled)

    def _maybe_commit(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_commit < self.commit_interval_s:
            return
        self._last_commit = time.monotonic()
        positions = self.book.to_commit()
        if not positions:
            return
        offsets = {TopicPartition(t, p): OffsetAndMetadata(pos, "", -1) for (t, p), pos in positions.items()}
        if not force:
            # In the loop: asynchronous, so a commit round trip never holds up the next frame.
            def done(_offsets: Any, response: Any) -> None:
                if isinstance(response, Exception):
                    log.warning("offset commit failed (%s); will retry", response)
                else:
                    self.book.committed(positions)
                    self.report.commits += 1

            try:
                self.consumer.commit_async(offsets, callback=done)
            except Exception as exc:  # noqa: BLE001 - a failed commit only means more replay after a crash
                log.warning("offset commit failed (%s); will retry", exc)
            return
        try:  # closing or revoked: the commit must be in before the partitions move on
            self.consumer.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - a failed commit only means more replay after a crash
            log.warning("offset commit failed (%s); will retry", exc)
            return
        self.book.committed(positions)
        self.report.commits += 1

    def close(self) -> None:
        """Publish what the session finished, flush, commit what it settled, leave the group, release
        the actors."""
        try:
            self.session.stop()
            self.publisher.close()
            self.producer.flush(10.0)
            self._settle()
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
        self.runner._settle()
        self.runner._maybe_commit(force=True)
        gone = {(tp.topic, tp.partition) for tp in revoked}
        self.runner.book.forget(list(gone))
        self.runner.intake.revoked(gone)
        self.runner.fetch.forget(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.runner.intake.assigned({(tp.topic, tp.partition) for tp in assigned})
