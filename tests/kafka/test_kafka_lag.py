"""`masklet run` metrics against the embedded broker: consumer lag, and counters that reconcile.

The runner is stepped in the test thread (in-process actors, the fake model, streams without
objects: cheap frames), so every sample of its stats is taken between two of its polls. The lag
test runs in both overload modes: with `"pause"` the runner pauses and resumes the frames
partition, which once stalled kafka-python on Tansu (4 of 40 frames consumed, then nothing) until
the runner re-seeked on resume.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from masklet.actors.payloads import ModelSpec
from masklet.monitoring.stats import frames_reconcile, frames_unaccounted
from masklet.actors.backend import InProcessBackend
from masklet.pipeline.kafka.client import producer_kwargs
from masklet.pipeline.kafka.codec import encode_jpeg, frame_headers
from masklet.pipeline.kafka.producer import RecoveringProducer
from masklet.pipeline.kafka.run import KafkaRunner
from masklet.pipeline.executor_config import ExecutorConfig
from masklet.pipeline.live import LiveConfig

FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")
RGB = np.full((48, 64, 3), 90, np.uint8)


def publish(settings, stream_id: str, count: int, corrupt: frozenset = frozenset()) -> None:
    """`count` frames of one stream (one partition), all acknowledged before returning."""
    producer = RecoveringProducer(producer_kwargs(settings))
    jpeg = encode_jpeg(RGB)
    for i in range(count):
        value = b"\xff\xd8\xff\xe0garbage" if i in corrupt else jpeg
        producer.send(settings.topics.frames, value, key=stream_id.encode(), headers=frame_headers(i, i / 30, 64, 48))
    assert producer.close(30).complete


def runner_for(settings, group: str, queue_capacity: int, overload: str = "drop") -> KafkaRunner:
    settings = settings.model_copy(update={"group_id": group})
    return KafkaRunner(settings, InProcessBackend(), FAKE, LiveConfig(ExecutorConfig(max_wait_ms=0), queue_capacity=queue_capacity),
                       overload=overload, commit_interval_s=0.05)


def step_until_drained(runner: KafkaRunner, frames: int, timeout_s: float = 25.0,
                       done: list | None = None) -> list[float]:
    """Step until all `frames` were consumed and the lag reads 0 (every one of them done: acked,
    dropped and settled, or dead-lettered); returns the lag sampled after each step and appends
    to `done` the frames topic's lowest not-yet-done offset at the same moments."""
    lags: list[float] = []
    deadline = time.monotonic() + timeout_s
    frames_topic = runner.settings.topics.frames
    while time.monotonic() < deadline:
        runner.step()
        lags.append(runner.stats.snapshot().value("masklet_kafka_consumer_lag"))
        if done is not None:
            done.append(sum(pos for (topic, _), pos in runner.book.positions().items() if topic == frames_topic))
        if runner.report.frames >= frames and lags[-1] == 0:
            return lags
    raise AssertionError(f"not drained in {timeout_s}s: {runner.report.summary()}, last lags {lags[-5:]}")


@pytest.mark.parametrize("overload", ["drop", "pause"])
def test_consumer_lag_counts_the_backlog_down_to_zero(kafka_settings, overload):
    n = 40
    publish(kafka_settings, "cam", n)  # the whole backlog is in Kafka before the runner starts
    runner = runner_for(kafka_settings, f"lag-{overload}", queue_capacity=8, overload=overload)
    done: list[int] = []
    try:
        lags = step_until_drained(runner, n, done=done)
    finally:
        runner.close()

    # Before the first fetch response no partition has a highwater: the gauge reads 0 until then.
    first = next((i for i, lag in enumerate(lags) if lag > 0), None)
    assert first is not None, f"the lag never rose above 0 while the backlog was consumed: {lags}"
    consuming = lags[first:]
    assert consuming[0] == n - done[first], (lags, done)  # highwater n, minus what was already done
    # Exactly the frames not yet done, at every sample (how many a step finishes depends on timing).
    assert all(lag == n - d for lag, d in zip(consuming, done[first:])), (lags, done)
    assert all(a >= b for a, b in zip(consuming, consuming[1:])), lags  # never up (nothing new published)...
    assert consuming[-1] == 0  # ...to 0 once all are processed
    assert runner.report.frames == n
    snap = runner.stats_snapshot()
    assert snap.value("masklet_kafka_consumer_lag") == 0
    assert snap.total("masklet_frames_in_total") == n
    assert snap.total("masklet_frames_published_total") == runner.report.acked > 0
    assert frames_reconcile(snap)  # the rest were dropped (queue_full) and counted


def test_dead_lettered_frame_counts_as_dropped_and_counters_reconcile(kafka_settings, consume_records):
    n, corrupt = 24, frozenset({3, 7})
    publish(kafka_settings, "cam", n, corrupt)
    runner = runner_for(kafka_settings, "reconcile", queue_capacity=2)  # 4 frames a poll: queue_full drops too
    try:
        step_until_drained(runner, n)
    finally:
        runner.close()

    assert runner.report.frames == n and runner.report.dead_letters == len(corrupt)
    assert len(consume_records(kafka_settings, kafka_settings.topics.deadletter, len(corrupt))) == len(corrupt)
    snap = runner.stats_snapshot()
    published = snap.total("masklet_frames_published_total")
    queue_full = snap.value("masklet_frames_dropped_total", reason="queue_full")
    assert snap.total("masklet_frames_in_total") == n  # the dead-lettered frames are counted in too
    assert published == runner.report.acked and 0 < published <= n - len(corrupt)
    assert snap.value("masklet_frames_dropped_total", reason="undecodable_frame") == len(corrupt)
    assert snap.value("masklet_deadletter_total", reason="undecodable_frame") == len(corrupt)
    assert snap.total("masklet_frames_dropped_total") == len(corrupt) + queue_full
    assert published + queue_full + len(corrupt) == n
    assert frames_unaccounted(snap) == 0 and frames_reconcile(snap)
