"""`masklet run` polls fast while it keeps up, slowly while its session is behind
(`Profile.busy_fetch_max_wait_ms`): at the edge of a 2-core machine the live profile's short fetch
waits (20 ms then) took CPU the model needed (pipeline/kafka/README.md, "Latency"), and slowly while idle
(`Profile.idle_fetch_max_wait_ms`).

The switch goes through kafka-python's fetcher config, which has no public setter; the first test
pins down that kafka-python still builds every fetch request from it, so an upgrade that changes
this fails here rather than silently leaving the wait fixed."""
from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from masklet.pipeline.kafka.client import PROFILES, consumer_kwargs, topic_partitions
from masklet.pipeline.kafka.fetch import FramesFetch
from masklet.pipeline.kafka.run import RunReport
from tests.kafka.test_kafka_lag import publish, runner_for


def test_each_fetch_request_carries_the_wait_set_last(kafka_settings):
    consumer = KafkaConsumer(**consumer_kwargs(kafka_settings, group=False))
    sent: list[int] = []
    build = consumer._fetcher._create_fetch_requests  # noqa: SLF001 - the seam under test

    def recording():
        requests = build()
        sent.extend(request.max_wait_ms for request, _ in requests.values())
        return requests

    consumer._fetcher._create_fetch_requests = recording  # noqa: SLF001
    topic = kafka_settings.topics.frames
    consumer.assign([TopicPartition(topic, p) for p in topic_partitions(consumer, topic)])
    fetch = FramesFetch(consumer, topic, RunReport())
    try:
        for wait in (PROFILES["live"].fetch_max_wait_ms, 123, PROFILES["live"].fetch_max_wait_ms):
            assert fetch.set_fetch_wait(wait) and fetch.fetch_wait_ms == wait
            sent.clear()
            deadline = time.monotonic() + 20
            while len(sent) < 2 and time.monotonic() < deadline:
                consumer.poll(timeout_ms=150)
            # the request in flight when the wait changed may carry the old value; the next ones not
            assert sent[1:] and set(sent[1:]) == {wait}, (wait, sent)
    finally:
        consumer.close()
    assert fetch.report.fetch_wait_changes == 3
    assert FramesFetch(object(), topic, RunReport()).set_fetch_wait(100) is False  # no such config: untouched


def test_the_runner_waits_longer_while_its_session_is_behind_and_returns_to_live_waits(kafka_settings):
    """Frames flow through a real runner; for the first steps its session reports a full queue on
    the stream (a fast fake model rarely leaves one full at the moment the runner looks, so it is
    forced), then its own figures. The fetch wait follows: busy, then the live profile's again."""
    import dataclasses

    live = PROFILES["live"]
    publish(kafka_settings, "cam", 10)
    runner = runner_for(kafka_settings, "fetch-wait", queue_capacity=2)
    real_status, forced = runner.session.status, {"on": True}

    def status(stream_id):
        figures = real_status(stream_id)
        return dataclasses.replace(figures, lag_frames=2) if forced["on"] else figures

    runner.session.status = status
    waits: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not runner.intake.streams and time.monotonic() < deadline:  # until the stream is open
            runner.step()
            waits.append(runner.fetch.fetch_wait_ms)
        for _ in range(3):
            runner.step()
            waits.append(runner.fetch.fetch_wait_ms)
        forced["on"] = False
        while time.monotonic() < deadline and not (runner.report.frames >= 10 and runner._drained()):  # noqa: SLF001
            runner.step()
            waits.append(runner.fetch.fetch_wait_ms)
        runner.step()
        waits.append(runner.fetch.fetch_wait_ms)
    finally:
        runner.close()
    assert runner.report.frames == 10, runner.report.summary()
    assert waits[0] == live.fetch_max_wait_ms, waits  # no stream yet: nothing is behind
    assert live.busy_fetch_max_wait_ms in waits, waits
    assert waits[-1] == live.fetch_max_wait_ms, waits
    assert runner.report.fetch_wait_changes >= 3, waits


def test_a_dropped_frame_counts_as_behind_even_when_the_queue_has_room_again(kafka_settings):
    import dataclasses

    live = PROFILES["live"]
    publish(kafka_settings, "cam", 4)
    runner = runner_for(kafka_settings, "fetch-wait-drops", queue_capacity=8)  # no real drop
    real_status, extra = runner.session.status, {"dropped": 0}

    def status(stream_id):
        figures = real_status(stream_id)
        return dataclasses.replace(figures, lag_frames=0, frames_dropped=figures.frames_dropped + extra["dropped"])

    runner.session.status = status
    try:
        deadline = time.monotonic() + 60
        while not runner.intake.streams and time.monotonic() < deadline:
            runner.step()
        runner.step()
        assert runner.fetch.fetch_wait_ms == live.fetch_max_wait_ms
        extra["dropped"] = 1  # one more drop since the last look
        runner.step()
        assert runner.fetch.fetch_wait_ms == live.busy_fetch_max_wait_ms
        runner.step()  # no new drop, room in the queue
        assert runner.fetch.fetch_wait_ms == live.fetch_max_wait_ms
    finally:
        runner.close()


def test_an_idle_run_polls_slowly_and_its_next_record_brings_the_live_wait_back(kafka_settings):
    """No record for `idle_after_s` and nothing in flight: the fetch wait goes to the profile's idle
    wait (an idle run polled 50 times a second at 20 ms: bench/kafka_contention.py); the first record
    after the quiet spell brings the live wait back at the next step."""
    import dataclasses

    live = PROFILES["live"]
    assert live.idle_fetch_max_wait_ms > live.fetch_max_wait_ms
    publish(kafka_settings, "cam", 3)
    runner = runner_for(kafka_settings, "fetch-wait-idle", queue_capacity=4)
    runner.profile = dataclasses.replace(live, idle_after_s=2.0)
    waits: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not (runner.report.frames >= 3 and runner._drained()) and time.monotonic() < deadline:  # noqa: SLF001
            runner.step()
            waits.append(runner.fetch.fetch_wait_ms)
        assert runner.report.frames == 3, runner.report.summary()
        while runner.fetch.fetch_wait_ms != live.idle_fetch_max_wait_ms and time.monotonic() < deadline:
            runner.step()
        quiet_s = time.monotonic() - runner._last_record_at  # noqa: SLF001
        assert runner.fetch.fetch_wait_ms == live.idle_fetch_max_wait_ms and quiet_s >= 2.0, (quiet_s, waits)
        assert live.fetch_max_wait_ms in waits, waits  # the live wait while the frames came
        publish(kafka_settings, "cam2", 1)
        while runner.report.frames < 4 and time.monotonic() < deadline:
            runner.step()
        runner.step()
        assert runner.report.frames == 4 and runner.fetch.fetch_wait_ms == live.fetch_max_wait_ms
    finally:
        runner.close()
