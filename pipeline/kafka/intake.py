"""The input side of `masklet run`: from a consumed record to a frame or prompt in the session.

    frames record --> PromptOrder (waits for the stream's prompts partition to be caught up)
                  --> misplaced? forward to its home partition (reroute.py)
                  --> InputGate (validate, decode) --> open the stream --> FrameReorder (index order,
                      losses named) --> LiveSession.submit_frame (or the --overload pause backlog)
    prompts record --> InputGate --> misplaced? forward --> LiveSession.submit_prompt (or held until
                      the stream's first frame)

`Intake` owns what the runner's loop needs between polls: the waiting frames, the reorder state,
the pause backlog and the prompts that wait for their stream. Offsets are recorded in the
runner's `OffsetBook` as records are consumed and marked done as they settle.
"""
from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from kafka import TopicPartition

from masklet.actors.messages import PromptMessage
from masklet.pipeline.kafka.deadletter import Rejected
from masklet.pipeline.kafka.gate import AcceptedFrame
from masklet.pipeline.kafka.publish import Settle
from masklet.pipeline.kafka.reorder import Refused, Release
from masklet.pipeline.kafka.reroute import home_partition
from masklet.pipeline.live import PromptRejected

if TYPE_CHECKING:
    from masklet.pipeline.kafka.run import KafkaRunner

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
    def tp(self) -> tuple[str, int]:
        return (self.record.topic, self.record.partition)


def key_text(key: Optional[bytes]) -> Optional[str]:
    try:
        return key.decode("utf-8") or None if key else None
    except UnicodeDecodeError:
        return None


class Intake:
    def __init__(self, runner: "KafkaRunner") -> None:
        self.r = runner
        self.backlog: deque[tuple[AcceptedFrame, int]] = deque()  # --overload pause: (frame, lost_before)
        self.held_prompts: dict[str, list[HeldPrompt]] = {}        # by stream id, oldest first
        self.prompt_waits: dict[str, list[tuple[int, tuple[str, int], int]]] = {}
        self.partition_streams: dict[int, set[str]] = {}           # frames partition -> streams read there
        # Streams this runner opened (it alone opens them): asking the session would take its lock,
        # which in-process actors hold for a whole model step.
        self.streams: set[str] = set()
        self._takes_lost = "lost_before" in inspect.signature(runner.session.submit_frame).parameters
        self._takes_published_until = "published_until" in inspect.signature(runner.session.open_stream).parameters

    def buffered(self) -> int:
        return len(self.backlog) + self.r.order.waiting() + self.r.reorder.held()

    # -- frames -----------------------------------------------------------------------------

    def frame_record(self, record: Any) -> None:
        r = self.r
        r.book.consumed((record.topic, record.partition), record.offset)
        r.fetch.consumed(record)
        r.report.frames += 1
        r.order.add(record.partition, record, self._prompts_partner(record.partition, key_text(record.key)))

    def _prompts_partner(self, frames_partition: int, stream_id: Optional[str]) -> Optional[TopicPartition]:
        """The prompts partition whose prompts a frame of this partition must not overtake."""
        topics = self.r.settings.topics
        frames_n, prompts_n = self.r.rerouter.partitions(topics.frames), self.r.rerouter.partitions(topics.prompts)
        if frames_n and frames_n == prompts_n:
            return TopicPartition(topics.prompts, frames_partition)  # co-partitioned, as the range assignor pairs them
        if prompts_n and stream_id:
            return TopicPartition(topics.prompts, home_partition(stream_id, prompts_n))
        return None

    def released(self, record: Any) -> None:
        """A frame record whose prompts are read: forward it, or validate, decode and reorder it."""
        r = self.r
        tp = (record.topic, record.partition)
        stream_id = key_text(record.key)
        if stream_id is not None and r.rerouter.misplaced(record, stream_id):
            r.publisher.send(record.topic, record.value, stream_id.encode(), r.rerouter.forward_headers(record),
                             Settle(((tp, record.offset),)), **r.rerouter.forward_target(record, stream_id, "frames"))
            return
        frame = r.gate.frame(record)
        if frame is None or not self._open(frame, record):
            self.refused_frame(tp, record.offset)
            return
        self.partition_streams.setdefault(record.partition, set()).add(frame.stream_id)
        for outcome in r.reorder.offer(frame):
            self.go(outcome)

    def go(self, outcome: Release | Refused) -> None:
        r = self.r
        frame = outcome.frame
        if isinstance(outcome, Refused):
            if outcome.kind == "out_of_order":
                self.submit(frame, 0)  # the session refuses it, counts it and settles its offset
            else:  # duplicate or late: the frame was accounted for already (published or reported lost)
                r.stats.inc("masklet_frames_redelivered_total", kind=outcome.kind)
                r.book.done((frame.topic, frame.partition), frame.offset)
            return
        if outcome.lost_before:
            r.report_lost(frame.stream_id, outcome)
        if r.overload == "pause":
            self.backlog.append((frame, outcome.lost_before))
        else:
            self.submit(frame, outcome.lost_before)

    def submit(self, frame: AcceptedFrame, lost_before: int) -> None:
        r = self.r
        extra = {"lost_before": lost_before} if self._takes_lost else {}
        try:
            r.session.submit_frame(frame.stream_id, frame.frame_idx, frame.pts, frame.image,
                                   token=((frame.topic, frame.partition), frame.offset), **extra)
        except ValueError as exc:  # the stream's frame size changed mid-stream
            r.deadletters.publish(Rejected("bad_frame_headers", "size_changed", str(exc)),
                                  source_topic=frame.topic, payload=b"", key=frame.stream_id.encode(),
                                  partition=frame.partition, offset=frame.offset)
            r.stats.inc("masklet_frames_dropped_total", reason="bad_frame_headers")
            self.refused_frame((frame.topic, frame.partition), frame.offset)

    def feed_backlog(self) -> None:
        blocked: set[str] = set()
        kept: deque[tuple[AcceptedFrame, int]] = deque()
        while self.backlog:
            frame, lost_before = self.backlog.popleft()
            if frame.stream_id in blocked or self.r.session.queue_room(frame.stream_id) < 1:
                blocked.add(frame.stream_id)  # keep this stream's order: nothing after it goes first
                kept.append((frame, lost_before))
            else:
                self.submit(frame, lost_before)
        self.backlog = kept

    def refused_frame(self, tp: tuple[str, int], offset: int) -> None:
        """A frame dead-lettered before the session took it (which counts the frames it takes):
        count it in here; whoever refused it counted the drop, with the dead-letter reason."""
        self.r.stats.inc("masklet_frames_in_total", source_type="kafka")
        self.r.dead_lettered(tp, offset)

    def _open(self, frame: AcceptedFrame, record: Any) -> bool:
        r = self.r
        if frame.stream_id in self.streams:
            return True
        outcome = r.resumer.plan(frame.stream_id, frame.frame_idx) if r.resumer is not None else None
        try:
            r.session.open_stream(frame.stream_id, *frame.size, source_type="kafka", **self._republishing(outcome))
        except ValueError as exc:  # max_streams reached
            r.deadletters.publish(Rejected("internal_error", "too_many_streams", str(exc)),
                                  source_topic=record.topic, payload=record.value, key=record.key,
                                  headers=record.headers, partition=record.partition, offset=record.offset)
            r.stats.inc("masklet_frames_dropped_total", reason="too_many_streams")
            return False
        r.report.streams.add(frame.stream_id)
        self.streams.add(frame.stream_id)
        if outcome is not None:
            r.resume_objects(outcome)
        for held in self.held_prompts.pop(frame.stream_id, []):
            if r.gate.recheck(held.prompt, held.record):  # after the resumed objects: the user's prompt wins
                self.submit_prompt(held.prompt, held.record)
            else:
                r.dead_lettered(held.tp, held.record.offset)
        return True

    def _republishing(self, outcome: Any) -> dict:
        """After a restart the replay republishes frames already in the masklets topic: the session
        numbers their revisions above the highest one there, so a consumer that keeps the highest
        revision never swaps a revised record for a stale replay."""
        if outcome is None or outcome.published_until is None or not self._takes_published_until:
            return {}
        return {"published_until": outcome.published_until, "revision_floor": outcome.revision_floor}

    # -- prompts ----------------------------------------------------------------------------

    def prompt_record(self, record: Any) -> None:
        r = self.r
        tp = (record.topic, record.partition)
        r.book.consumed(tp, record.offset)
        r.report.prompts += 1
        prompt = r.gate.prompt(record)
        if prompt is None:
            r.dead_lettered(tp, record.offset)
        elif r.rerouter.misplaced(record, prompt.stream_id):
            r.publisher.send(record.topic, record.value, prompt.stream_id.encode(), r.rerouter.forward_headers(record),
                             Settle(((tp, record.offset),), forwarded_prompt=True),
                             **r.rerouter.forward_target(record, prompt.stream_id, "prompts"))
        elif prompt.stream_id in self.streams:
            self.submit_prompt(prompt, record)
        else:
            # Its stream's first frame may simply not be here yet: after a restart or a rebalance
            # the prompts partition is often read first, and a replayed prompt must not be lost.
            held = HeldPrompt(time.monotonic() + r.unknown_stream_hold_s, prompt, record)
            self.held_prompts.setdefault(prompt.stream_id, []).append(held)

    def submit_prompt(self, prompt: PromptMessage, record: Any) -> None:
        try:
            self.r.session.submit_prompt(prompt)
        except PromptRejected as exc:
            self.r.reject(Rejected(_PROMPT_REASONS.get(exc.reason, "malformed_prompt"), exc.reason, str(exc)), record)
            return
        self.prompt_waits.setdefault(prompt.stream_id, []).append(
            (prompt.frame_idx, (record.topic, record.partition), record.offset))

    def expire_held_prompts(self) -> None:
        now = time.monotonic()
        for stream_id, held in list(self.held_prompts.items()):
            while held and held[0].deadline <= now:
                self.r.reject(Rejected("unknown_stream", "unknown_stream",
                                       f"no frame of stream {stream_id!r} arrived within "
                                       f"{self.r.unknown_stream_hold_s:g} s of its prompt"), held.pop(0).record)
            if not held:
                del self.held_prompts[stream_id]

    def settle_prompts(self, stream_id: str, frame_idx: int) -> None:
        """A record of the stream at `frame_idx` is acknowledged: prompts at or before it took effect."""
        waits = self.prompt_waits.get(stream_id, [])
        for wait in [w for w in waits if w[0] <= frame_idx]:
            self.r.book.done(wait[1], wait[2])
            waits.remove(wait)

    def revoked(self, revoked: set[tuple[str, int]]) -> None:
        """Partitions revoked: drop what waits for them (read again from the last commit, here or by
        their new owner); the streams' order history stays until `assigned` says who owns them."""
        topics = self.r.settings.topics
        frames = [p for t, p in revoked if t == topics.frames]
        self.r.order.forget(frames)
        self.r.reorder.unhold(set().union(set(), *(self.partition_streams.get(p, set()) for p in frames)))
        for stream_id, held in list(self.held_prompts.items()):
            held[:] = [h for h in held if h.tp not in revoked]
            if not held:
                del self.held_prompts[stream_id]

    def assigned(self, assigned: set[tuple[str, int]]) -> None:
        """After a rebalance: streams whose frames partition went to another member are forgotten."""
        topics = self.r.settings.topics
        for partition in [p for p in self.partition_streams if (topics.frames, p) not in assigned]:
            self.r.reorder.forget(self.partition_streams.pop(partition))
