"""The control API's Kafka feeder: frames of one stream id read from the frames topic go into a live
session as JPEG bytes (header-checked only) and are decoded by decoder actors, not in the replica."""
from __future__ import annotations

import threading
import time

from kafka import KafkaProducer

from masklet.actors.backend import InProcessBackend
from masklet.actors.payloads import EncodedImage, ModelSpec
from masklet.deploy.feeders import Feeder, kafka_frames
from masklet.pipeline.kafka.client import producer_kwargs
from masklet.pipeline.kafka.codec import encode_jpeg, frame_headers
from masklet.pipeline.live import LiveSession
from tests.pipeline.configs import live_cfg
from tests.pipeline.fakes import synthetic_frames

FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")


class Recorder(InProcessBackend):
    def __init__(self) -> None:
        super().__init__()
        self.decoded = 0

    def call(self, actor, method, *args, num_returns=1):
        if method == "decode":
            self.decoded += len(args)
        return super().call(actor, method, *args, num_returns=num_returns)


def test_kafka_feeder_hands_jpegs_to_decoder_actors(kafka_settings):
    frames = synthetic_frames(6, 48, 64)
    backend = Recorder()
    session = LiveSession(backend, FAKE, live_cfg(max_wait_ms=0))
    session.start()
    stop = threading.Event()
    source = kafka_frames(kafka_settings, "cam", max_frames=len(frames))
    seen = []

    def frames_seen(stop_flag):
        for frame in source(stop_flag):
            seen.append(frame)
            yield frame

    feeder = Feeder(session, "cam", "kafka:cam", frames_seen, source_type="kafka")
    feeder.start()
    producer = KafkaProducer(**producer_kwargs(kafka_settings))
    deadline = time.monotonic() + 60
    try:
        while not seen and time.monotonic() < deadline:  # wait for the viewer to be at the end of the topic
            producer.send(kafka_settings.topics.frames, key=b"cam", value=encode_jpeg(frames[0]),
                          headers=frame_headers(0, 0.0, 64, 48)).get(timeout=10)
            time.sleep(0.5)
        for i, rgb in enumerate(frames[1:], 1):
            producer.send(kafka_settings.topics.frames, key=b"cam", value=encode_jpeg(rgb),
                          headers=frame_headers(i + 100, i / 25, 64, 48)).get(timeout=10)
        while len(seen) < len(frames) and time.monotonic() < deadline:
            time.sleep(0.1)
        while time.monotonic() < deadline and (
                "cam" not in session.streams() or session.status("cam").frames_published < len(seen)):
            time.sleep(0.1)
    finally:
        producer.close()
        stop.set()
        feeder.stop()
    assert len(seen) == len(frames) and all(isinstance(f.rgb, EncodedImage) for f in seen)
    assert backend.decoded == len(seen)  # every frame decoded by a decoder actor
    assert session.status("cam").frames_published == len(seen)
    session.shutdown()
