"""Cross-topic order (issue 11.1): a prompt sent before frame k's record applies at or before k.

The end-to-end tests run `KafkaRunner` on the embedded broker with the fake model; the unit tests
drive `PromptOrder` over a stub consumer to pin down each rule of the wait.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
from kafka import TopicPartition

from masklet.monitoring.stats import Stats
from masklet.pipeline.kafka.ingest import ingest
from masklet.pipeline.kafka.order import FetchWitness, PromptOrder
from masklet.pipeline.kafka.prompts import build_prompt, publish_prompt
from tests.kafka.test_kafka_run import FAKE, Background, publish_frames, records_of

PROMPTS0 = TopicPartition("p", 0)


def test_a_prompt_sent_before_ingest_is_in_every_record_from_frame_0(kafka_settings, consume_records, videos_dir):
    """The issue's steps: run; `masklet prompt --frame 0`; `masklet ingest CLIP --max-frames 20`."""
    bg = Background(kafka_settings, FAKE)
    try:
        assert publish_prompt(build_prompt("cam9", 1, frame_idx=0, points=[(500, 300)]), kafka_settings).complete
        assert ingest(str(videos_dir / "01_dog.mp4"), "cam9", kafka_settings, max_frames=20).delivery.complete
        records = records_of(consume_records, kafka_settings, 20)
    finally:
        bg.close()
    assert [r.frame_idx for r in records] == list(range(20))
    without = [r.frame_idx for r in records if 1 not in {o.object_id for o in r.objects}]
    assert not without, f"records without object 1: {without}"


def test_a_run_started_after_everything_was_sent_applies_the_prompt_from_frame_0(kafka_settings, consume_records,
                                                                                 videos_dir):
    """A restart replays both topics at once: the frames backlog must not overtake the prompt."""
    assert publish_prompt(build_prompt("late", 1, frame_idx=0, points=[(500, 300)]), kafka_settings).complete
    assert ingest(str(videos_dir / "01_dog.mp4"), "late", kafka_settings, max_frames=24).delivery.complete
    bg = Background(kafka_settings, FAKE)
    try:
        records = records_of(consume_records, kafka_settings, 24)
    finally:
        bg.close()
    assert [r.frame_idx for r in records] == list(range(24))
    without = [r.frame_idx for r in records if 1 not in {o.object_id for o in r.objects}]
    assert not without, f"records without object 1: {without}"


def test_prompts_produced_mid_stream_apply_at_the_frames_they_name(kafka_settings, consume_records):
    """Each prompt is acknowledged just before the frame it names is sent, while the stream runs."""
    frames = [np.full((48, 64, 3), 40 + 6 * i, np.uint8) for i in range(24)]
    for f in frames:
        f[10:30, 20:44] = (200, 40, 40)
    starts = {1: 6, 2: 15}  # object id -> the frame its prompt names
    bg = Background(kafka_settings, FAKE)
    try:
        cursor = 0
        for object_id, k in sorted(starts.items(), key=lambda item: item[1]):
            publish_frames(kafka_settings, "mid", frames, cursor, k)
            prompt = build_prompt("mid", object_id, frame_idx=k, box=(20, 10, 44, 30))
            assert publish_prompt(prompt, kafka_settings).complete
            cursor = k
        publish_frames(kafka_settings, "mid", frames, cursor, len(frames))
        records = records_of(consume_records, kafka_settings, len(frames))
    finally:
        bg.close()
    assert [r.frame_idx for r in records] == list(range(len(frames)))
    for r in records:
        expected = {oid for oid, k in starts.items() if r.frame_idx >= k}
        assert {o.object_id for o in r.objects} == expected, (r.frame_idx, r.objects)


# -- PromptOrder's rules, on a stub consumer ----------------------------------------------------


class StubFetcher:
    def __init__(self) -> None:
        self._completed_fetches: list = []
        self._next_partition_records = None

    def _handle_fetch_response(self, node_id, fetch_offsets, send_time, response):
        return None


class StubConsumer:
    def __init__(self) -> None:
        self._fetcher = StubFetcher()
        self.assigned = {TopicPartition("f", 0), PROMPTS0}
        self.high: dict = {}
        self.pos: dict = {}
        self._subscription = SimpleNamespace(position=lambda tp: self.pos.get(tp))

    def assignment(self):
        return self.assigned

    def highwater(self, tp):
        return self.high.get(tp)

    def respond(self, *tps) -> None:
        """A fetch response whose request covered `tps`."""
        self._fetcher._handle_fetch_response(0, {tp: 0 for tp in tps}, 0.0, None)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make_order(consumer: StubConsumer, clock: Clock, stats: Stats) -> PromptOrder:
    return PromptOrder(consumer, max_wait_s=1.0, stats=stats, clock=clock, witness=FetchWitness(consumer))


def test_a_frame_waits_for_unread_prompts_and_for_a_response_at_least_as_new_as_its_own():
    consumer, clock, stats = StubConsumer(), Clock(), Stats()
    order = make_order(consumer, clock, stats)
    consumer.respond(PROMPTS0)
    consumer.high[PROMPTS0], consumer.pos[PROMPTS0] = 3, 2  # one prompt not yet read
    order.add(0, "frame-a", PROMPTS0)
    assert order.release() == []
    consumer.pos[PROMPTS0] = 3                              # read now, but the frame came after that response
    consumer.respond(TopicPartition("f", 0))                # a response that did not cover the prompts partition
    order.add(0, "frame-b", PROMPTS0)
    assert order.release() == ["frame-a"]                   # frame-a's own response covered it
    consumer._fetcher._completed_fetches.append(SimpleNamespace(topic_partition=PROMPTS0))
    consumer.respond(PROMPTS0)                              # covered again, but its data is still unread
    assert order.release() == []
    consumer._fetcher._completed_fetches.clear()
    assert order.release() == ["frame-b"]
    assert stats.snapshot().value("masklet_kafka_prompt_waits_total", outcome="caught_up") == 2
    assert stats.snapshot().value("masklet_kafka_prompt_waits_total", outcome="timed_out") == 0


def test_a_wait_is_bounded_and_counted_and_a_foreign_prompts_partition_is_not_waited_for():
    consumer, clock, stats = StubConsumer(), Clock(), Stats()
    order = make_order(consumer, clock, stats)
    order.add(0, "stuck", PROMPTS0)                         # no fetch response for the prompts partition yet
    assert order.release() == [] and order.next_deadline() == clock.t + 1.0
    clock.t += 0.999
    assert order.release() == []
    clock.t += 0.002
    assert order.release() == ["stuck"]
    order.add(0, "elsewhere", TopicPartition("p", 3))       # assigned to another member
    assert order.release() == ["elsewhere"]
    snap = stats.snapshot()
    assert snap.value("masklet_kafka_prompt_waits_total", outcome="timed_out") == 1
    assert snap.value("masklet_kafka_prompt_waits_total", outcome="unpaired") == 1
    assert snap.histogram("masklet_kafka_prompt_wait_seconds").count == 2


def test_frames_of_one_partition_keep_their_order_and_room_limits_a_release():
    consumer, clock, stats = StubConsumer(), Clock(), Stats()
    order = make_order(consumer, clock, stats)
    consumer.respond(PROMPTS0)
    consumer.high[PROMPTS0] = consumer.pos[PROMPTS0] = 5
    for name in "abcd":
        order.add(0, name, PROMPTS0)
    assert order.release(room=3) == ["a", "b", "c"]
    assert order.release(blocked=True) == []                # a forwarded prompt is not yet acknowledged
    assert order.release() == ["d"] and order.waiting() == 0
    time.sleep(0)  # nothing timed: the stub clock never moved
    assert stats.snapshot().value("masklet_kafka_prompt_waits_total", outcome="caught_up") == 1  # "d" waited
