"""Third-party producers (issue 12.6): librdkafka's partitioner is not kafka-python's murmur2.

confluent-kafka (librdkafka 2.16) produces a stream's frames and its prompt with librdkafka's
default partitioner (`consistent_random`, CRC32 of the key), which puts this stream on another
partition than `masklet ingest` would. `masklet run` forwards those records to the stream's home
partition, so the stream is tracked in order and its prompt applies from the frame it names.
"""
from __future__ import annotations

import time
import zlib

import numpy as np
from confluent_kafka import Producer

from masklet.pipeline.kafka.codec import encode_jpeg, frame_headers
from masklet.pipeline.kafka.prompts import build_prompt, publish_prompt
from masklet.pipeline.kafka.reroute import FORWARDED_HEADER, home_partition
from tests.kafka.test_kafka_run import FAKE, Background, records_of

FRAMES, PARTITIONS, PROMPT_AT = 16, 4, 3


def a_stream_librdkafka_misplaces() -> str:
    for n in range(100):
        stream_id = f"cam-{n}"
        if zlib.crc32(stream_id.encode()) % PARTITIONS != home_partition(stream_id, PARTITIONS):
            return stream_id
    raise AssertionError("no stream id that the two partitioners place apart")


def test_frames_and_prompts_from_librdkafka_reach_their_stream_in_order(kafka_settings, consume_records):
    stream_id = a_stream_librdkafka_misplaces()
    rgb = np.full((48, 64, 3), 70, np.uint8)
    rgb[10:30, 20:44] = (200, 40, 40)
    producer = Producer({"bootstrap.servers": kafka_settings.bootstrap_servers, "linger.ms": 0})
    placed: list = []

    def delivered(err, msg):
        placed.append((err, msg.topic(), msg.partition()))

    bg = Background(kafka_settings, FAKE)
    try:
        prompt = build_prompt(stream_id, 1, frame_idx=PROMPT_AT, box=(20, 10, 44, 30))
        producer.produce(kafka_settings.topics.prompts, prompt.to_json_bytes(), key=stream_id.encode(),
                         on_delivery=delivered)
        assert producer.flush(30) == 0
        for i in range(FRAMES):
            producer.produce(kafka_settings.topics.frames, encode_jpeg(rgb), key=stream_id.encode(),
                             headers=frame_headers(i, i / 10, 64, 48), on_delivery=delivered)
        assert producer.flush(30) == 0
        records = records_of(consume_records, kafka_settings, FRAMES)
        runner = bg.runner
    finally:
        bg.close()
    home = home_partition(stream_id, PARTITIONS)
    assert all(err is None for err, _, _ in placed) and {p for _, _, p in placed} == {zlib.crc32(stream_id.encode()) % 4}
    assert home not in {p for _, _, p in placed}  # librdkafka really put them elsewhere
    assert [r.frame_idx for r in records] == list(range(FRAMES))
    assert [bool(r.objects) for r in records] == [i >= PROMPT_AT for i in range(FRAMES)]
    snap = runner.stats_snapshot()
    assert snap.value("masklet_kafka_forwarded_total", topic="frames") == FRAMES
    assert snap.value("masklet_kafka_forwarded_total", topic="prompts") == 1
    forwarded = [r for r in consume_records(kafka_settings, kafka_settings.topics.frames, 2 * FRAMES)
                 if r.partition == home]
    assert len(forwarded) == FRAMES and all(FORWARDED_HEADER in dict(r.headers) for r in forwarded)


def test_a_librdkafka_producer_set_to_murmur2_needs_no_forwarding(kafka_settings, consume_records):
    stream_id = a_stream_librdkafka_misplaces()
    producer = Producer({"bootstrap.servers": kafka_settings.bootstrap_servers, "partitioner": "murmur2_random"})
    bg = Background(kafka_settings, FAKE)
    try:
        for i in range(4):
            producer.produce(kafka_settings.topics.frames, encode_jpeg(np.full((48, 64, 3), 90, np.uint8)),
                             key=stream_id.encode(), headers=frame_headers(i, i / 10, 64, 48))
        assert producer.flush(30) == 0
        records = records_of(consume_records, kafka_settings, 4)
        runner = bg.runner
    finally:
        bg.close()
    assert [r.frame_idx for r in records] == [0, 1, 2, 3]
    assert runner.report.forwarded == 0


def test_two_members_a_stream_split_by_two_partitioners_is_tracked_by_its_home_member(kafka_settings,
                                                                                      consume_records):
    """Frames from librdkafka (CRC32), the prompt from `masklet prompt` (murmur2), on partitions
    that the range assignor gives to different members: only forwarding brings them together."""
    stream_id = next(s for s in (f"split-{n}" for n in range(1000))
                     if (zlib.crc32(s.encode()) % PARTITIONS < 2) != (home_partition(s, PARTITIONS) < 2))
    settings = kafka_settings.model_copy(update={"group_id": "two-members"})
    members = [Background(settings, FAKE), Background(settings, FAKE)]
    try:
        deadline = time.monotonic() + 120
        while not all(len(m.runner.consumer.assignment()) == 2 * PARTITIONS // 2 for m in members):
            assert time.monotonic() < deadline, [m.runner.consumer.assignment() for m in members]
            time.sleep(0.1)
        assert publish_prompt(build_prompt(stream_id, 1, frame_idx=PROMPT_AT, box=(20, 10, 44, 30)),
                              settings).complete
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
        rgb = np.full((48, 64, 3), 70, np.uint8)
        rgb[10:30, 20:44] = (200, 40, 40)
        for i in range(FRAMES):
            producer.produce(settings.topics.frames, encode_jpeg(rgb), key=stream_id.encode(),
                             headers=frame_headers(i, i / 10, 64, 48))
        assert producer.flush(30) == 0
        records = records_of(consume_records, settings, FRAMES)
    finally:
        for member in members:
            member.close()
    assert [r.frame_idx for r in records] == list(range(FRAMES))
    assert [bool(r.objects) for r in records] == [i >= PROMPT_AT for i in range(FRAMES)]
    assert sorted(m.runner.report.records for m in members) == [0, FRAMES]  # one member tracked it all
    assert sum(m.runner.report.forwarded for m in members) == FRAMES
