"""One embedded broker per test module; each test gets its own topics on it."""
from __future__ import annotations

import re
import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from masklet.pipeline.config import KafkaSettings, KafkaTopics
from masklet.pipeline.kafka.broker import EmbeddedBroker
from masklet.pipeline.kafka.client import consumer_kwargs, topic_partitions


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker(port=0, topics=()) as running:
        yield running


@pytest.fixture
def kafka_settings(broker, request) -> KafkaSettings:
    """Settings whose four topics are fresh, so tests sharing the module's broker never see each other."""
    prefix = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:80]
    topics = KafkaTopics(frames=f"{prefix}.frames", prompts=f"{prefix}.prompts",
                         masklets=f"{prefix}.masklets", deadletter=f"{prefix}.deadletter")
    broker.create_topics([topics.frames, topics.prompts, topics.masklets, topics.deadletter])
    return KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topics=topics)


def consume(settings: KafkaSettings, topic: str, expected: int, timeout_s: float = 15.0) -> list:
    """Read every partition of `topic` from the start until `expected` records arrived or time is up.

    Records come back sorted by (partition, offset): each stream id (key) lives in one partition,
    so a stream's records are in their stored order. No consumer group: Tansu's first group join
    costs seconds, and its end offsets are unreliable.
    """
    consumer = KafkaConsumer(**consumer_kwargs(settings, group=False))
    ids = topic_partitions(consumer, topic, timeout_s)
    assert ids, f"topic {topic} has no partitions in the broker's metadata after {timeout_s} s"
    partitions = [TopicPartition(topic, p) for p in ids]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records, deadline = [], time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
    finally:
        consumer.close()
    return sorted(records, key=lambda record: (record.partition, record.offset))


@pytest.fixture
def consume_records():
    return consume
