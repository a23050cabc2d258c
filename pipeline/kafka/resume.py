"""Objects survive a restart of `masklet run`: a stream that opens on a member is re-seeded from
its newest record already in the masklets topic.

Why the output topic: it already holds every object's mask on every processed frame, keyed by
stream. Nothing extra is written on the hot path, nothing needs flushing before a crash, and it
works the same after a crash, a clean restart or a rebalance (when another member published the
record), on the embedded broker and on a real cluster.

What is resumed: every object *present* in the stream's newest record before the first frame the
new session sees (the frame the replay starts from) is re-added with its mask as a mask prompt on
that first frame, under the same object id. So the first new record carries the masks of one
frame earlier, and the tracker's memory restarts from them (the original clicks, and the memory
of older frames, are gone). Objects absent from that record are not resumed: their last mask
would be a guess at where they are now; they are named in the log and in `ResumeOutcome`.

How the newest record is found without ListOffsets (Tansu answers it wrongly, see run.py): the
stream's partition is the producer's (murmur2 of the key, as kafka-python's and Java's default
partitioners); one fetch yields the partition's high watermark (carried by every fetch response);
then windows of offsets are read backwards from it until a record of the stream older than the
first new frame turns up, `scan_records` records have been read, or `timeout_s` has passed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from masklet.pipeline.config import KafkaSettings, ResumeSettings
from masklet.pipeline.kafka.client import consumer_kwargs, topic_partitions
from masklet.actors.messages import MaskletRecord, MessageError, PromptMessage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeOutcome:
    """What re-seeding one stream found: the record used (None: nothing recent) and its objects."""

    stream_id: str
    first_frame_idx: int                   # the frame the prompts apply to
    source_frame_idx: Optional[int]        # the record the masks come from
    prompts: tuple[PromptMessage, ...]     # one mask `add` per object present in that record
    absent_object_ids: tuple[int, ...]     # listed in that record without a mask: not resumed
    published_until: Optional[int] = None  # the stream's newest frame already in the topic (replays repeat it)
    revision_floor: int = 0                # the highest revision among the records read

    @property
    def resumed_object_ids(self) -> tuple[int, ...]:
        return tuple(p.object_id for p in self.prompts)


def resume_prompts(record: MaskletRecord, first_frame_idx: int) -> tuple[tuple[PromptMessage, ...], tuple[int, ...]]:
    """Mask `add` prompts at `first_frame_idx` for the record's present objects, and the absent ids."""
    prompts, absent = [], []
    for obj in record.objects:
        if obj.present and obj.area > 0:
            prompts.append(PromptMessage(stream_id=record.stream_id, object_id=obj.object_id,
                                         frame_idx=first_frame_idx, action="add", mask=obj.rle))
        else:
            absent.append(obj.object_id)
    return tuple(prompts), tuple(absent)


class NewestRecordFinder:
    """Reads back the masklets topic for a stream's newest record before a frame.

    One consumer outside the group (manual assignment, no commits), reused for every stream.
    """

    def __init__(self, settings: KafkaSettings, consumer: Any = None) -> None:
        self.topic = settings.topics.masklets
        self.config: ResumeSettings = settings.resume
        # fetch_max_wait_ms: the broker would hold a fetch of an empty or fully read partition
        # for 500 ms (the default), and the scan stalls the runner's poll loop meanwhile.
        # 1 MB fetches, not the 16/64 MB sized for frames: masklet records are small, and the
        # first fetch (from the log start, for the high watermark) is otherwise up to 16 MB.
        self.consumer = consumer or KafkaConsumer(**consumer_kwargs(
            settings, group=False, max_poll_records=max(64, min(self.config.window, 1000)), fetch_max_wait_ms=20,
            max_partition_fetch_bytes=1 << 20, fetch_max_bytes=1 << 20))

    def close(self) -> None:
        self.consumer.close()

    def newest_before(self, stream_id: str, frame_idx: int) -> tuple[Optional[MaskletRecord], int]:
        """The stream's record with the highest frame index in
        [frame_idx - max_gap_frames, frame_idx), or None; and how many records were read.
        `self.seen` then holds the newest frame index and the highest revision of every record of
        the stream read on the way (the replayed frames' records sit after that record)."""
        self.seen = _Seen()
        deadline = time.monotonic() + self.config.timeout_s
        key = stream_id.encode("utf-8")
        tp = self._partition_of(key, deadline)
        if tp is None:
            return None, 0
        self.consumer.assign([tp])
        try:
            return self._newest_in(tp, key, frame_idx, deadline)
        finally:
            # Unassign, so that every lookup starts from fresh partition state: kafka-python keeps a
            # partition's state (its last high watermark included) when it is assigned again.
            self.consumer.assign([])

    def _newest_in(self, tp: TopicPartition, key: bytes, frame_idx: int,
                   deadline: float) -> tuple[Optional[MaskletRecord], int]:
        high = self._high_watermark(tp, deadline)
        if high is None:
            return None, 0
        oldest_useful = frame_idx - self.config.max_gap_frames
        best: Optional[MaskletRecord] = None
        read, end = 0, high
        while end > 0 and read < self.config.scan_records and time.monotonic() < deadline:
            begin = max(0, end - self.config.window)
            window_best, window_read, past_gap = self._scan(tp, begin, end, key, frame_idx, oldest_useful, deadline)
            read += window_read
            if window_best is not None and (best is None or window_best.frame_idx > best.frame_idx):
                best = window_best
            if best is not None or past_gap:
                break  # newest offsets come first: nothing further back can be newer or in range
            end = begin
        return best, read

    def _partition_of(self, key: bytes, deadline: float) -> Optional[TopicPartition]:
        ordered = topic_partitions(self.consumer, self.topic, max(0.0, deadline - time.monotonic()))
        if not ordered:
            return None  # the topic does not exist: nothing was ever published
        return TopicPartition(self.topic, ordered[(murmur2(key) & 0x7FFFFFFF) % len(ordered)])

    def _high_watermark(self, tp: TopicPartition, deadline: float) -> Optional[int]:
        self.consumer.seek(tp, 0)  # an offset before the log start resets to the earliest one
        while time.monotonic() < deadline:
            self.consumer.poll(timeout_ms=self._poll_ms(deadline), max_records=1)
            high = self.consumer.highwater(tp)
            if high is not None:
                return high
        return None

    def _scan(self, tp: TopicPartition, begin: int, end: int, key: bytes, frame_idx: int, oldest_useful: int,
              deadline: float) -> tuple[Optional[MaskletRecord], int, bool]:
        """Offsets [begin, end): the stream's newest usable record, records read, and whether a
        record of the stream older than the gap was seen."""
        self.consumer.seek(tp, begin)
        best: Optional[MaskletRecord] = None
        read, past_gap = 0, False
        while time.monotonic() < deadline:
            batch = self.consumer.poll(timeout_ms=self._poll_ms(deadline))
            for message in batch.get(tp, []):
                if message.offset >= end:
                    return best, read, past_gap
                read += 1
                if message.key != key:
                    continue
                record = _parse(message.value)
                if record is None or record.stream_id != key.decode("utf-8"):
                    continue
                self.seen.add(record)
                if record.frame_idx >= frame_idx:
                    continue
                if record.frame_idx < oldest_useful:
                    past_gap = True
                elif best is None or record.frame_idx > best.frame_idx:
                    best = record
            if self.consumer.position(tp) >= end:
                return best, read, past_gap
        return best, read, past_gap

    @staticmethod
    def _poll_ms(deadline: float) -> int:
        return max(1, min(200, int((deadline - time.monotonic()) * 1000)))


@dataclass
class _Seen:
    """Across the records of one stream read by one lookup: the newest frame, the highest revision."""

    newest_frame_idx: Optional[int] = None
    max_revision: int = 0

    def add(self, record: MaskletRecord) -> None:
        if self.newest_frame_idx is None or record.frame_idx > self.newest_frame_idx:
            self.newest_frame_idx = record.frame_idx
        self.max_revision = max(self.max_revision, record.revision)


def _parse(value: bytes) -> Optional[MaskletRecord]:
    try:
        return MaskletRecord.from_json_bytes(value)
    except (MessageError, ValueError):
        return None  # not ours to judge: consumers of the topic see the same bytes


class ObjectResumer:
    """Used by `KafkaRunner` when a stream opens: find the record, build the prompts, log."""

    def __init__(self, settings: KafkaSettings, finder: Optional[NewestRecordFinder] = None) -> None:
        self.finder = finder or NewestRecordFinder(settings)

    def plan(self, stream_id: str, first_frame_idx: int) -> ResumeOutcome:
        try:
            record, _ = self.finder.newest_before(stream_id, first_frame_idx)
        except Exception as exc:  # noqa: BLE001 - the stream must start, with or without its objects
            log.warning("stream %s: could not read back its last record (%s); it starts without objects", stream_id, exc)
            return ResumeOutcome(stream_id, first_frame_idx, None, (), ())
        seen = getattr(self.finder, "seen", None) or _Seen()
        if record is None:
            return ResumeOutcome(stream_id, first_frame_idx, None, (), (), seen.newest_frame_idx, seen.max_revision)
        prompts, absent = resume_prompts(record, first_frame_idx)
        outcome = ResumeOutcome(stream_id, first_frame_idx, record.frame_idx, prompts, absent,
                                seen.newest_frame_idx, seen.max_revision)
        log.warning("stream %s: resuming at frame %d from its record of frame %d: objects %s; absent then, "
                    "not resumed: %s", stream_id, first_frame_idx, record.frame_idx,
                    list(outcome.resumed_object_ids), list(absent))
        return outcome

    def close(self) -> None:
        self.finder.close()
