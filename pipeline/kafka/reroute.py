"""Third-party producers: records on the wrong partition are forwarded to their stream's partition.

A stream is owned by the group member that holds partition murmur2(stream id) % n of the frames
and prompts topics (kafka-python's and Java's default partitioner, which `masklet ingest` and
`masklet prompt` use). Other clients partition differently: librdkafka (confluent-kafka, kcat, Go
and .NET clients) defaults to `consistent_random`, CRC32 of the key. Their frames and prompts of a
stream then sit on another partition, possibly owned by another member, where the stream's state
(trackers, held prompts, its frames' order) is not.

As Kafka Streams does when a key changes (its repartition topics), the member that reads such a
record produces it again, unchanged, to the right partition of the same topic: same key (for a
prompt, its `stream_id`), value, headers and timestamp, plus a `masklet_forwarded_from` header
naming where it came from. Its own offset is done when the copy is acknowledged, so a crash in
between forwards it again (at-least-once; a duplicate frame is recognised by its index). Because
the forwarding member releases frames only after its own prompts partition is caught up and after
every prompt it forwarded is acknowledged, a stream whose frames and prompts come from one client
(one partitioner) keeps its cross-topic order through the forward. Forwarding costs one more
produce and fetch per misplaced record; point producers at murmur2 (librdkafka:
`partitioner=murmur2_random`) to avoid it.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from kafka.partitioner.default import murmur2

log = logging.getLogger(__name__)

FORWARDED_HEADER = "masklet_forwarded_from"


def home_partition(stream_id: str, partitions: int) -> int:
    """kafka-python's / Java's default partitioner for a keyed record."""
    return (murmur2(stream_id.encode("utf-8")) & 0x7FFFFFFF) % partitions


class Rerouter:
    def __init__(self, consumer: Any, stats: Any = None) -> None:
        self.consumer = consumer
        self.stats = stats
        self._counts: dict[str, int] = {}
        self.forwarded = 0

    def partitions(self, topic: str) -> int:
        """The topic's partition count from the consumer's metadata (0 while unknown)."""
        ids = self.consumer.partitions_for_topic(topic)
        count = len(ids) if ids else 0
        if count and self._counts.get(topic) not in (None, count):
            log.warning("topic %s now has %d partitions (was %d): streams move to new home partitions",
                        topic, count, self._counts[topic])
        if count:
            self._counts[topic] = count
        return count

    def home(self, topic: str, stream_id: str) -> Optional[int]:
        count = self.partitions(topic)
        return home_partition(stream_id, count) if count else None

    def misplaced(self, record: Any, stream_id: str) -> bool:
        home = self.home(record.topic, stream_id)
        return home is not None and record.partition != home

    def forward_headers(self, record: Any) -> list[tuple[str, bytes]]:
        headers = [(k, v) for k, v in (record.headers or []) if k != FORWARDED_HEADER]
        return headers + [(FORWARDED_HEADER, f"{record.partition}:{record.offset}".encode())]

    def forward_target(self, record: Any, stream_id: str, kind: str) -> dict[str, Any]:
        """`producer.send` keywords that put a copy of `record` on its stream's partition, with its
        original timestamp (CreateTime: the cross-topic order compares the producer's clocks)."""
        self.forwarded += 1
        if self.stats is not None:
            self.stats.inc("masklet_kafka_forwarded_total", topic=kind)
        create_time = getattr(record, "timestamp_type", 0) == 0 and (getattr(record, "timestamp", -1) or -1) >= 0
        return {"partition": self.home(record.topic, stream_id),
                "timestamp_ms": record.timestamp if create_time else None}
