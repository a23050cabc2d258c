"""kafka-python keyword arguments for Masklet's producers, consumers and admin clients.

Connection and security settings (SASL_SSL/SCRAM, TLS files) come from
`pipeline.config.KafkaSettings.client_kwargs()` unchanged, so a real cluster and the embedded
broker are configured the same way; this module adds the per-role tuning measured on Tansu.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from masklet.pipeline.config import KafkaSettings

MB = 1024 * 1024

# crc32c must be importable: kafka-python falls back to a pure-Python CRC at ~6 MB/s otherwise.
PRODUCER_THROUGHPUT = {"linger_ms": 5, "batch_size": 1 * MB, "compression_type": None}


@dataclass(frozen=True)
class Profile:
    """Latency versus throughput (`kafka.live.profile`); see pipeline/kafka/README.md "Latency".

    Measured on the embedded broker (Tansu): a record that arrives during a fetch waits for part of
    that fetch's wait, so each consuming hop costs latency that grows with `fetch_max_wait_ms`
    (one record every 200-400 ms: p50 5-7 ms at 20 ms, 18-21 at 100, 47-85 at 500). Shorter waits
    mean more fetches: 20 ms costs ~16% of a core for the client and ~6% for the broker while idle
    (500 ms: ~3% and ~1%). Real Kafka answers as soon as a record is there, so against it a long
    wait costs no latency.
    """

    # The broker holds an empty fetch this long. `live` uses 50 ms, not 20: on 2 cores the polling
    # CPU of 20 ms slowed the model by more than the shorter hops saved (bench/kafka_hops.py
    # PROFILE@MS, 3 rotated repeats: added p50 +167 -> +119 ms for 1 stream @ 2 fps, +315 -> +222 ms
    # for 4 streams @ 0.5 fps; broker CPU 5.6-7.2 s -> 2.9-5.2 s per trial; hops +3-8 ms p50).
    # kafka_bench.py agreed on p99 (+148 -> +66 ms at 1 stream, +373 -> +212 at 4) and at 1
    # stream on p50 (+98 -> +89); at 4 streams its p50 stayed (+270 -> +276).
    fetch_max_wait_ms: int
    # ...while the session is behind (a stream's queue is full): a frame fetched sooner would only
    # wait in that queue, and the polling's CPU is what the saturated model lacks. Measured at the
    # edge of 2 cores (bench/kafka_bench.py, 4 streams): `live` added +876 ms p50, `throughput`
    # +228 ms; the fetch waits were the difference that matters there.
    busy_fetch_max_wait_ms: int
    linger_ms: int              # a producer batch waits this long for more records
    commit_interval_s: float    # how often `masklet run` commits settled offsets
    poll_timeout_ms: int        # the runner's consumer.poll timeout (it returns early on records)
    # ...once no record has come for `idle_after_s` and nothing is in flight: an idle `masklet run`
    # polled 50 times a second at a 20 ms wait, 0.09-0.13 cores in its process and 0.04-0.06 in the
    # broker (bench/kafka_contention.py); at 500 ms, 0.013 and 0.007. The first record after a quiet spell
    # then waits up to this long once; the next fetch is short again.
    idle_fetch_max_wait_ms: int = 500
    idle_after_s: float = 10.0


PROFILES = {
    "live": Profile(fetch_max_wait_ms=50, busy_fetch_max_wait_ms=100, linger_ms=0, commit_interval_s=0.5,
                    poll_timeout_ms=50),
    "throughput": Profile(fetch_max_wait_ms=500, busy_fetch_max_wait_ms=500, linger_ms=5, commit_interval_s=2.0,
                          poll_timeout_ms=200),
}


def profile_of(settings: KafkaSettings) -> Profile:
    return PROFILES[settings.live.profile]

# Large enough for one 4K JPEG at the pixel cap plus headers; the broker default (1 MB) is not.
MAX_REQUEST_BYTES = 16 * MB


def crc32c_available() -> bool:
    try:
        import crc32c  # noqa: F401
    except ImportError:
        return False
    return True


def settings_from(bootstrap_servers: str | None = None, settings: KafkaSettings | None = None) -> KafkaSettings:
    """Settings with `--bootstrap-servers` applied on top (env/YAML already applied by the caller)."""
    settings = settings or KafkaSettings()
    if bootstrap_servers:
        settings = settings.model_copy(update={"bootstrap_servers": KafkaSettings(
            bootstrap_servers=bootstrap_servers).bootstrap_servers})
    return settings


def producer_kwargs(settings: KafkaSettings, *, acks: int | str = "all", **overrides: Any) -> dict[str, Any]:
    """Producer config: idempotence off, because kafka-python 3.x's idempotent producer never
    leaves its fatal state after a broker restart (InitProducerId -> UnknownError); delivery is
    at-least-once through `RecoveringProducer` instead, and consumers de-duplicate by key."""
    kwargs = {
        **settings.client_kwargs(),
        **PRODUCER_THROUGHPUT,
        "linger_ms": profile_of(settings).linger_ms,
        "acks": acks,
        "enable_idempotence": False,
        # Few internal retries: kafka-python re-enqueues retried batches among newer ones (measured:
        # frames interleaved after a broker restart with unbounded retries). Failing fast hands the
        # outage to RecoveringProducer, which resends everything unacknowledged in send order.
        "retries": 5,
        "max_in_flight_requests_per_connection": 1,
        "request_timeout_ms": 10_000,
        "delivery_timeout_ms": 30_000,
        "max_block_ms": 10_000,
        "max_request_size": MAX_REQUEST_BYTES,
        "reconnect_backoff_ms": 50,
        "reconnect_backoff_max_ms": 1000,
    }
    kwargs.update(overrides)
    return kwargs


def consumer_kwargs(settings: KafkaSettings, *, group: bool = True, **overrides: Any) -> dict[str, Any]:
    """Consumer config: manual commits (offsets move only after the output is acknowledged)."""
    base = settings.consumer_kwargs() if group else settings.client_kwargs()
    kwargs = {
        **base,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": profile_of(settings).fetch_max_wait_ms,
        "fetch_max_bytes": 64 * MB,
        "max_partition_fetch_bytes": MAX_REQUEST_BYTES,
        "request_timeout_ms": 30_000 if group else 10_000,
        "reconnect_backoff_ms": 50,
        "reconnect_backoff_max_ms": 1000,
    }
    if not group:
        kwargs.pop("group_id", None)
    kwargs.update(overrides)
    return kwargs


def topic_partitions(consumer: Any, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The topic's partition ids, sorted; [] if it has none after `timeout_s`.

    Asked again until then: right after a broker restart (or a topic's auto-creation) a metadata
    answer can list the topic without partitions, and kafka-python then returns an empty set.
    Falling back to partition 0 read the wrong partition (measured: a test found none of its 150
    records, which sat in partition 3)."""
    deadline = time.monotonic() + timeout_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions or time.monotonic() >= deadline:
            return sorted(partitions or ())
        time.sleep(0.1)
        # kafka-python asks the broker again only when the topic is absent from its cache; a topic
        # cached with no partitions would be returned empty until metadata_max_age_ms (5 min) passes
        # (CI: 60 s of empty answers after a broker restart). `topics()` forces a fresh metadata fetch.
        consumer.topics()


def admin_kwargs(settings: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    kwargs = {**settings.client_kwargs(), "request_timeout_ms": 10_000}
    kwargs.update(overrides)
    return kwargs


def ensure_topics(settings: KafkaSettings, partitions: int = 1, replication_factor: int = 1) -> list[str]:
    """Create the four Masklet topics where missing; returns the names that were created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    topics = settings.topics
    wanted = [topics.frames, topics.prompts, topics.masklets, topics.deadletter]
    admin = KafkaAdminClient(**admin_kwargs(settings))
    created = []
    try:
        existing = set(admin.list_topics())
        for name in wanted:
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, partitions, replication_factor)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return created
