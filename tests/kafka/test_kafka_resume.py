"""Objects survive a restart of `masklet run`: re-seeding a stream from its newest masklet record."""
from __future__ import annotations

import time

import numpy as np
from kafka import KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2

from masklet.pipeline.config import ResumeSettings
from masklet.pipeline.kafka.client import producer_kwargs
from masklet.pipeline.kafka.fetch import FramesFetch
from masklet.pipeline.kafka.resume import NewestRecordFinder, resume_prompts
from masklet.pipeline.kafka.run import RunReport
from masklet.actors.messages import MaskletRecord, ObjectMask, PromptMessage
from masklet.actors.rle import decode_rle, encode_mask, mask_bbox
from tests.kafka.test_kafka_run import FAKE, Background, publish_frames, send_raw
from tests.pipeline.fakes import synthetic_frames


def record(stream_id: str, frame_idx: int, objects=()) -> MaskletRecord:
    return MaskletRecord(stream_id=stream_id, frame_idx=frame_idx, pts=frame_idx / 30, width=64, height=48,
                         model="test", objects=list(objects))


def object_mask(object_id: int, mask: np.ndarray, present: bool = True) -> ObjectMask:
    return ObjectMask(object_id=object_id, rle=encode_mask(mask), bbox=tuple(mask_bbox(mask)), area=int(mask.sum()),
                      score=1.0 if present else -1.0, iou=0.5, present=present)


def with_resume(settings, **fields):
    return settings.model_copy(update={"resume": ResumeSettings(**fields)})


def publish_records(settings, records: list[MaskletRecord], partition: int) -> None:
    """Into one partition, in this order (noise from other streams shares it on purpose)."""
    producer = KafkaProducer(**producer_kwargs(settings))
    for r in records:
        producer.send(settings.topics.masklets, r.to_json_bytes(), key=r.stream_id.encode(), partition=partition)
    producer.flush(30)
    producer.close(10)


def partition_of(finder: NewestRecordFinder, stream_id: str) -> int:
    return finder._partition_of(stream_id.encode(), time.monotonic() + 10).partition  # noqa: SLF001


def test_finder_walks_back_past_other_streams_and_replayed_duplicates(kafka_settings):
    settings = with_resume(kafka_settings, window=8, max_gap_frames=90)
    finder = NewestRecordFinder(settings)
    try:
        partition = partition_of(finder, "cam")
        assert partition == (murmur2(b"cam") & 0x7FFFFFFF) % 4
        history = [record("cam", i) for i in range(30)]
        noise = [record("other", i) for i in range(40)]  # 5 windows of someone else's records
        replayed = [record("cam", i) for i in (26, 27, 28)]  # acked before the crash, then replayed
        publish_records(settings, history + noise + replayed, partition)

        found, read = finder.newest_before("cam", 26)
        assert found is not None and found.frame_idx == 25, (found, read)
        assert read > len(noise)  # it had to walk back over the other stream's windows
        found, _ = finder.newest_before("cam", 29)
        assert found.frame_idx == 28  # the newest by frame index, wherever it sits in the log
        assert finder.newest_before("cam", 0)[0] is None  # nothing before the first frame
        assert finder.newest_before("cam", 200)[0] is None  # too stale: 90 frames at most
        assert finder.newest_before("nobody", 10)[0] is None
        # the same partition again, after more was published: the new high watermark is used
        publish_records(settings, [record("cam", i) for i in range(30, 36)], partition)
        assert finder.newest_before("cam", 36)[0].frame_idx == 35
    finally:
        finder.close()

    bounded = NewestRecordFinder(with_resume(kafka_settings, window=8, scan_records=16))
    try:  # the scan stops after scan_records, inside the other stream's records
        found, read = bounded.newest_before("cam", 26)
        assert found is None and read <= 16 + 8, read
    finally:
        bounded.close()


def test_finder_on_an_empty_topic_finds_nothing_quickly(kafka_settings):
    finder = NewestRecordFinder(with_resume(kafka_settings, timeout_s=2.0))
    try:
        started = time.monotonic()
        assert finder.newest_before("cam", 10) == (None, 0)
        assert time.monotonic() - started < 10  # bounded by timeout_s (plus one metadata round trip)
    finally:
        finder.close()


def test_only_present_objects_are_resumed_with_their_masks():
    mask = np.zeros((48, 64), bool)
    mask[10:20, 30:44] = True
    last = record("cam", 41, [object_mask(1, mask), object_mask(3, np.zeros((48, 64), bool), present=False)])
    prompts, absent = resume_prompts(last, 42)
    assert absent == (3,)
    [p] = prompts
    assert isinstance(p, PromptMessage) and (p.action, p.object_id, p.frame_idx) == ("add", 1, 42)
    assert np.array_equal(decode_rle({"size": list(p.mask.size), "counts": p.mask.counts}), mask)


def red_square_mask(frame_idx: int) -> np.ndarray:
    """Where synthetic_frames draws the red square on frame `frame_idx` (64x48)."""
    mask = np.zeros((48, 64), bool)
    x0 = 4 + (frame_idx * 2) % (64 - 20)
    mask[16:30, x0:x0 + 14] = True
    return mask


def on_target(mask: np.ndarray, frame_idx: int) -> bool:
    """The fake model masks cells of a 4x4 grid (16x12 px): the mask must cover part of the red
    square and little else."""
    return bool((mask & red_square_mask(frame_idx)).any()) and mask.sum() <= mask.size // 4


def mask_of(r: MaskletRecord, object_id: int) -> np.ndarray:
    [obj] = [o for o in r.objects if o.object_id == object_id]
    return decode_rle({"size": list(obj.rle.size), "counts": obj.rle.counts})


def run_once(settings, frames, start: int, stop: int, consume_records, prompt_at=None) -> tuple[list, Background]:
    bg = Background(settings, FAKE)
    try:
        publish_frames(settings, "cam", frames, start, start + 2)
        bg.wait_for_streams("cam")
        if prompt_at is not None:
            x0 = 4 + (prompt_at * 2) % 44
            msg = PromptMessage(stream_id="cam", object_id=1, frame_idx=prompt_at, action="add",
                                points=[(x0 + 7, 23)], labels=[1])
            send_raw(settings, settings.topics.prompts, msg.to_json_bytes(), b"cam")
            bg.wait_for_prompts(1)  # consumed (and held) before its frame arrives
        publish_frames(settings, "cam", frames, start + 2, stop)
        records = [MaskletRecord.from_json_bytes(r.value)
                   for r in consume_records(settings, settings.topics.masklets, stop, 60)]
    finally:
        bg.close()  # a clean stop commits; a crash is covered by test_kafka_run's SIGKILL test
    return records, bg


def test_a_restarted_runner_resumes_the_objects_of_the_last_record(kafka_settings, consume_records):
    frames = synthetic_frames(20)
    before, _ = run_once(kafka_settings, frames, 0, 10, consume_records, prompt_at=4)
    assert [len(r.objects) for r in before] == [0] * 4 + [1] * 6
    assert on_target(mask_of(before[9], 1), 9)  # tracked before the restart

    after, second = run_once(kafka_settings, frames, 10, 20, consume_records)
    resumed = [r for r in after if r.frame_idx >= 10]
    assert [r.frame_idx for r in resumed] == list(range(10, 20))
    [outcome] = second.runner.report.resumed
    assert (outcome.first_frame_idx, outcome.source_frame_idx, outcome.resumed_object_ids) == (10, 9, (1,))
    # The object is back without a new prompt, under its id, on every new frame, and its first new
    # mask comes from the seed (the fake tracker's later drift is its own, as in an unbroken run).
    assert all([o.object_id for o in r.objects] == [1] for r in resumed), [r.objects for r in resumed]
    assert on_target(mask_of(resumed[0], 1), 10)
    assert "resumed_objects=1" in second.runner.report.summary()


def test_resume_can_be_switched_off(kafka_settings, consume_records):
    frames = synthetic_frames(16)
    run_once(kafka_settings, frames, 0, 8, consume_records, prompt_at=3)
    off = with_resume(kafka_settings, enabled=False)
    after, second = run_once(off, frames, 8, 16, consume_records)
    assert second.runner.report.resumed == []
    assert all(r.objects == [] for r in after if r.frame_idx >= 8)


def test_a_prompt_read_before_its_streams_first_frame_is_held_not_dead_lettered(kafka_settings, consume_records):
    """After a restart the prompts partition is often read before the frames one: a replayed
    prompt must wait for its stream instead of being refused as an unknown stream."""
    frames = synthetic_frames(6)
    bg = Background(kafka_settings, FAKE)
    try:
        msg = PromptMessage(stream_id="cam", object_id=1, frame_idx=2, action="add", points=[(15, 23)], labels=[1])
        send_raw(kafka_settings, kafka_settings.topics.prompts, msg.to_json_bytes(), b"cam")
        bg.wait_for_prompts(1)
        assert bg.runner.session.streams() == []  # held: no frame of "cam" yet
        publish_frames(kafka_settings, "cam", frames, 0, 6)
        records = [MaskletRecord.from_json_bytes(r.value)
                   for r in consume_records(kafka_settings, kafka_settings.topics.masklets, 6, 60)]
    finally:
        bg.close()
    assert [len(r.objects) for r in records] == [0, 0, 1, 1, 1, 1]
    assert bg.runner.report.dead_letters == 0


def test_pause_mode_gets_through_a_backlog_fetched_in_one_go(kafka_settings, consume_records):
    """`--overload pause` with a queue of 1: one fetch brings all 40 frames, the runner pauses
    with records of that fetch parked by kafka-python, and must get every one of them back on
    resume (kafka-python 3.0.12 alone stalled here; see FramesFetch._restore_parked_records)."""
    frames = synthetic_frames(40)
    bg = Background(kafka_settings, FAKE, config={"queue_capacity": 1, "max_in_flight": 1})
    try:
        publish_frames(kafka_settings, "cam", frames, 0, 40)
        records = consume_records(kafka_settings, kafka_settings.topics.masklets, 40, 60)
    finally:
        bg.close()
    assert sorted(MaskletRecord.from_json_bytes(r.value).frame_idx for r in records) == list(range(40))


class _UsedUp:
    """kafka-python's PartitionRecords once every record was taken: falsy, yet not None."""

    def __bool__(self) -> bool:
        return False


class _StubConsumer:
    def __init__(self) -> None:
        self._fetcher = type("Fetcher", (), {})()
        self._fetcher._next_partition_records = _UsedUp()
        self.calls: list[str] = []

    def assignment(self):
        return {TopicPartition("frames", 0), TopicPartition("prompts", 0)}

    def pause(self, *tps):
        self.calls.append(f"pause {sorted(tp.topic for tp in tps)}")

    def resume(self, *tps):
        self.calls.append(f"resume {sorted(tp.topic for tp in tps)}")

    def seek(self, tp, offset):
        self.calls.append(f"seek {tp.topic} {offset}")


def test_resume_empties_kafka_pythons_used_up_records_slot_so_parked_records_come_back():
    consumer, report = _StubConsumer(), RunReport()
    fetch = FramesFetch(consumer, "frames", report)
    fetch.consumed(type("Record", (), {"topic": "frames", "partition": 0, "offset": 22})())
    fetch.pause_or_resume(full=True)
    fetch.pause_or_resume(full=True)  # already paused: nothing more
    assert consumer._fetcher._next_partition_records is not None
    fetch.pause_or_resume(full=False)
    assert consumer.calls == ["pause ['frames']", "resume ['frames']", "seek frames 23"]
    assert consumer._fetcher._next_partition_records is None and report.parked_restores == 1


def test_a_replay_after_a_restart_republishes_above_the_highest_revision_in_the_topic(kafka_settings,
                                                                                      consume_records):
    """Issue 11.5: a consumer keeping the highest revision per (stream, frame) never has a revised
    record replaced by a stale replay. The first run publishes frames 0-9 (some revised, by a late
    prompt); a second run in another group replays them all."""
    frames = synthetic_frames(14)
    bg = Background(kafka_settings, FAKE)
    try:
        publish_frames(kafka_settings, "cam", frames, 0, 10)
        consume_records(kafka_settings, kafka_settings.topics.masklets, 10, 60)
        x0 = 4 + (6 * 2) % 44
        late = PromptMessage(stream_id="cam", object_id=1, frame_idx=6, action="add", points=[(x0 + 7, 23)], labels=[1])
        send_raw(kafka_settings, kafka_settings.topics.prompts, late.to_json_bytes(), b"cam")
        deadline = time.monotonic() + 60  # frames 6-9 were published: the late prompt revises them
        while bg.runner.session.status("cam").revisions < 4:
            assert time.monotonic() < deadline, bg.runner.session.status("cam")
            time.sleep(0.05)
        first = [MaskletRecord.from_json_bytes(r.value) for r in consume_records(
            kafka_settings, kafka_settings.topics.masklets, 14, 60)]
    finally:
        bg.close()
    floor = max(r.revision for r in first)
    assert floor >= 1 and [r.frame_idx for r in first if r.revision] == [6, 7, 8, 9], [(r.frame_idx, r.revision) for r in first]

    replay = kafka_settings.model_copy(update={"group_id": "replay"})  # a new member: replays from offset 0
    second = Background(replay, FAKE)
    try:
        publish_frames(replay, "cam", frames, 10, 14)
        records = [MaskletRecord.from_json_bytes(r.value) for r in consume_records(
            replay, replay.topics.masklets, len(first) + 14, 60)]
    finally:
        second.close()
    replayed = records[len(first):]
    assert sorted(r.frame_idx for r in replayed) == list(range(14))
    assert all(r.revision == floor + 1 for r in replayed if r.frame_idx <= 9), [(r.frame_idx, r.revision) for r in replayed]
    assert all(r.revision == 0 for r in replayed if r.frame_idx >= 10)
    latest: dict = {}
    for r in records:  # what a consumer keeping the highest revision ends up with
        if r.revision >= latest.get(r.frame_idx, r).revision:
            latest[r.frame_idx] = r
    assert all(latest[i] in replayed for i in range(14))
