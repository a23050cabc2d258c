"""Broker restarts while frames are being produced: no hang, no silent loss."""
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from masklet.pipeline.kafka.client import producer_kwargs
from masklet.pipeline.kafka.ingest import ingest
from masklet.pipeline.kafka.producer import ProducerGaveUp, RecoveringProducer
from masklet.actors.sources import DecodedFrame

FRAMES = 150


@contextmanager
def _synthetic_clip(uri, *, max_pixels, max_frames):
    source = type("Clip", (), {"fps": 100.0})()

    def frames():
        for idx in range(FRAMES):
            yield DecodedFrame(idx, idx / 100.0, np.full((72, 128, 3), idx % 256, np.uint8), (128, 72))

    source.frames = frames
    yield source


def _ingest_across_restart(broker, settings, producer):
    """Ingest 1.5 s of frames (paced by pts) and restart the broker in the middle."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(report=ingest(
        "clip.mp4", "cam", settings, realtime=True, open_fn=_synthetic_clip, producer=producer)), daemon=True)
    worker.start()
    time.sleep(0.6)
    broker.restart()  # the reconnecting producer makes Tansu auto-create the topic (same partition count)
    worker.join(timeout=90)
    assert not worker.is_alive(), "ingest hung after the broker restart"
    return result["report"]


def _frame_indices(records):
    return [int(dict(record.headers)["frame_idx"]) for record in records]


@pytest.mark.parametrize("idempotent", [False, True], ids=["masklet-default", "kafka-python-idempotent"])
def test_producer_recovers_from_broker_restart_and_reports_loss(broker, kafka_settings, consume_records, idempotent):
    config = producer_kwargs(kafka_settings, enable_idempotence=idempotent)
    if idempotent:
        config.pop("max_in_flight_requests_per_connection")  # kafka-python's default for idempotence
    producer = RecoveringProducer(config, recovery_backoff_s=0.2)
    report = _ingest_across_restart(broker, kafka_settings, producer)
    producer.close()
    delivery = report.delivery

    assert report.frames_sent == FRAMES and not report.gave_up
    assert delivery.unacked == 0 and delivery.lost == []
    # The memory-only broker forgot what it had stored before the restart; the producer noticed and said so.
    assert delivery.broker_resets >= 1
    reported_lost = delivery.acked_then_lost_by_broker
    stored = _frame_indices(consume_records(kafka_settings, kafka_settings.topics.frames, FRAMES - reported_lost, 60))
    missing = set(range(FRAMES)) - set(stored)
    assert missing, "a memory-only broker restart must lose the records stored before it"
    assert len(missing) <= reported_lost  # no silent loss: every missing frame is accounted for
    assert set(range(max(missing) + 1, FRAMES)) <= set(stored)  # everything after the restart arrived
    if idempotent:
        # kafka-python's idempotent producer is stuck after the restart; only recreating it helps.
        assert delivery.recoveries >= 1
    # Order across a restart is NOT asserted: measured on Tansu, a topic auto-created by the
    # reconnecting producer can answer one produce with UnknownError and then keep a second log for
    # the same partition (offsets 1, 2, ... handed out again), so the stored records interleave.
    # Consumers therefore order by frame_idx and treat an older frame_idx as late or duplicate.


def test_producer_gives_up_when_the_broker_stays_down(broker, kafka_settings):
    config = producer_kwargs(kafka_settings, delivery_timeout_ms=2000, request_timeout_ms=1000,
                             max_block_ms=1000, bootstrap_timeout_ms=1000)
    producer = RecoveringProducer(config, max_recoveries=2, recovery_backoff_s=0.1)
    producer.send(kafka_settings.topics.frames, b"before", key=b"cam")
    assert producer.flush(10).complete
    broker.kill()
    started = time.monotonic()
    try:
        with pytest.raises(ProducerGaveUp) as gave_up:
            for _ in range(3):
                producer.send(kafka_settings.topics.frames, b"after", key=b"cam")
            producer.flush(30)
    finally:
        broker.start()  # leave the module's broker running for teardown
    assert time.monotonic() - started < 30
    report = gave_up.value.report
    assert len(report.lost) == 3 and report.recoveries == 2
    with pytest.raises(ProducerGaveUp):
        producer.send(kafka_settings.topics.frames, b"later", key=b"cam")
