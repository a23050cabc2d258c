"""`masklet run` against the embedded broker: round trip, two streams, dead letters, crash and resume."""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from masklet.actors.payloads import ModelSpec
from masklet.actors.backend import InProcessBackend
from masklet.pipeline.kafka.client import consumer_kwargs, producer_kwargs, topic_partitions
from masklet.pipeline.kafka.codec import encode_jpeg, frame_headers
from masklet.pipeline.kafka.ingest import ingest
from masklet.pipeline.kafka.producer import RecoveringProducer
from masklet.pipeline.kafka.run import KafkaRunner
from masklet.pipeline.executor_config import ExecutorConfig
from masklet.pipeline.live import LiveConfig
from masklet.actors.messages import MaskletRecord, PromptMessage
from masklet.actors.rle import decode_rle
from masklet.actors.sources import open_source

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ModelSpec("sam2.1_hiera_tiny", None, 256, "cpu")
FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")


def clip_frames(videos_dir: Path, name: str, count: int) -> list[np.ndarray]:
    with open_source(str(videos_dir / name), max_frames=count) as source:
        return [f.rgb for f in source.frames()]


def publish_frames(settings, stream_id: str, frames: list[np.ndarray], start: int, stop: int) -> None:
    """What `masklet ingest` sends, for a slice of frames (ingest itself always starts at frame 0)."""
    producer = RecoveringProducer(producer_kwargs(settings))
    for i in range(start, stop):
        h, w = frames[i].shape[:2]
        producer.send(settings.topics.frames, encode_jpeg(frames[i]), key=stream_id.encode(),
                      headers=frame_headers(i, i / 30, w, h))
    assert producer.close(30).complete


def send_raw(settings, topic: str, value: bytes, key: bytes, headers=None) -> None:
    producer = RecoveringProducer(producer_kwargs(settings))
    producer.send(topic, value, key=key, headers=headers or [])
    assert producer.close(30).complete


def prompt(settings, stream_id: str, frame_idx: int, box) -> None:
    msg = PromptMessage(stream_id=stream_id, object_id=1, frame_idx=frame_idx, action="add", box=box)
    send_raw(settings, settings.topics.prompts, msg.to_json_bytes(), stream_id.encode())


class Background:
    """A KafkaRunner looping in a thread of the test process (in-process actors)."""

    def __init__(self, settings, model: ModelSpec, **kw) -> None:
        self.runner = KafkaRunner(settings, InProcessBackend(), model, LiveConfig(**kw.pop("config", {})),
                                  overload=kw.pop("overload", "pause"), **kw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.runner.run, args=(self.stop.is_set,), daemon=True)
        self.thread.start()

    def wait_for_prompts(self, count: int, timeout: float = 30) -> None:
        """Until the runner has consumed `count` prompts (held by the session for their frame)."""
        deadline = time.monotonic() + timeout
        while self.runner.report.prompts < count:
            assert time.monotonic() < deadline, f"{self.runner.report.prompts} of {count} prompts consumed"
            time.sleep(0.02)

    def wait_for_streams(self, *ids: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not set(ids) <= set(self.runner.session.streams()):
            assert time.monotonic() < deadline, f"streams {ids} never opened"
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def records_of(consume, settings, expected: int, timeout: float = 60) -> list[MaskletRecord]:
    return [MaskletRecord.from_json_bytes(r.value) for r in consume(settings, settings.topics.masklets, expected, timeout)]


def committed(settings, topic: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(**consumer_kwargs(settings))
    try:
        parts = topic_partitions(consumer, topic)
        assert parts, f"topic {topic} has no partitions"
        return {p: consumer.committed(TopicPartition(topic, p)) for p in parts}
    finally:
        consumer.close()


def test_round_trip_with_a_prompt_mid_stream(kafka_settings, consume_records, videos_dir):
    frames = clip_frames(videos_dir, "01_dog.mp4", 20)
    bg = Background(kafka_settings, TINY)
    try:
        assert ingest(str(videos_dir / "01_dog.mp4"), "dog", kafka_settings, max_frames=10).delivery.complete
        bg.wait_for_streams("dog")
        prompt(kafka_settings, "dog", 14, (300, 150, 900, 650))  # a future frame: applied when it arrives
        bg.wait_for_prompts(1)  # consumed before frame 14 is even published
        publish_frames(kafka_settings, "dog", frames, 10, 20)
        records = records_of(consume_records, kafka_settings, 20)
    finally:
        bg.close()
    assert [r.frame_idx for r in records] == list(range(20))  # one per frame, in order
    assert all(r.stream_id == "dog" and (r.width, r.height) == (1280, 720) for r in records)
    assert [len(r.objects) for r in records] == [0] * 14 + [1] * 6
    for r in records[14:]:
        rle = r.objects[0].rle
        mask = decode_rle({"size": list(rle.size), "counts": rle.counts})
        assert mask.shape == (720, 1280) and int(mask.sum()) == r.objects[0].area
    assert bg.runner.report.acked == 20
    frames_commits = {p: c for p, c in committed(kafka_settings, kafka_settings.topics.frames).items() if c}
    assert list(frames_commits.values()) == [20]  # every input offset committed after its record's ack


def test_two_streams_batch_together_and_stay_ordered(kafka_settings, consume_records, videos_dir):
    clips = {"dog": clip_frames(videos_dir, "01_dog.mp4", 14), "cups": clip_frames(videos_dir, "02_cups.mp4", 14)}
    bg = Background(kafka_settings, TINY, config={"executor": ExecutorConfig(max_batch_size=8, max_wait_ms=50)})
    try:
        for sid, frames in clips.items():
            publish_frames(kafka_settings, sid, frames, 0, 2)
        bg.wait_for_streams(*clips)
        for sid, frames in clips.items():
            h, w = frames[0].shape[:2]
            prompt(kafka_settings, sid, 4, (w / 4, h / 4, w / 2, h / 2))
        bg.wait_for_prompts(2)
        for sid, frames in clips.items():
            publish_frames(kafka_settings, sid, frames, 2, 14)
        records = records_of(consume_records, kafka_settings, 28)
        sizes = bg.runner.session.encoder_batch_sizes()
    finally:
        bg.close()
    for sid in clips:
        mine = [r for r in records if r.stream_id == sid]
        assert [r.frame_idx for r in mine] == list(range(14))
        assert [len(r.objects) for r in mine] == [0] * 4 + [1] * 10
    assert max(sizes) > 1, sizes  # batched across the two streams
    snap = bg.runner.session.stats_snapshot()
    assert snap.value("masklet_frames_encoded_total") == 20


def test_dead_letters_keep_the_stream_going(kafka_settings, consume_records):
    rgb = np.full((48, 64, 3), 90, np.uint8)
    good = lambda i: (encode_jpeg(rgb), frame_headers(i, i / 30, 64, 48))  # noqa: E731
    bg = Background(kafka_settings, FAKE, unknown_stream_hold_s=1.0)
    frames_topic = kafka_settings.topics.frames
    try:
        send_raw(kafka_settings, frames_topic, *good(0)[:1], b"cam", good(0)[1])
        bg.wait_for_streams("cam")
        send_raw(kafka_settings, frames_topic, b"\xff\xd8\xff\xe0garbage", b"cam", frame_headers(1, 1 / 30, 64, 48))
        send_raw(kafka_settings, frames_topic, pickle.dumps({"x": 1}), b"cam", frame_headers(2, 2 / 30, 64, 48))
        send_raw(kafka_settings, frames_topic, good(3)[0], b"cam", frame_headers(3, 0.1, 100_000, 100_000))
        send_raw(kafka_settings, kafka_settings.topics.prompts, b'{"schema": "prompt/v1", "stream_id": ', b"cam")
        prompt(kafka_settings, "ghost", 0, (1, 1, 5, 5))  # unknown stream
        for i in (4, 5):
            send_raw(kafka_settings, frames_topic, good(i)[0], b"cam", good(i)[1])
        records = records_of(consume_records, kafka_settings, 3)
        # the ghost's prompt is held for a first frame of its stream (1 s here), then dead-lettered
        letters = [json.loads(r.value) for r in consume_records(kafka_settings, kafka_settings.topics.deadletter, 5, 30)]
    finally:
        bg.close()
    assert [r.frame_idx for r in records] == [0, 4, 5]
    reasons = sorted(letter["reason"] for letter in letters)
    assert reasons == sorted(["undecodable_frame", "undecodable_frame", "frame_too_large", "malformed_prompt",
                              "unknown_stream"])
    assert any("pickle_payload" in letter["detail"] for letter in letters)
    assert bg.runner.report.dead_letters == 5


def _run_cli(settings, group: str, backend: str = "inprocess") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for name in ("frames", "prompts", "masklets", "deadletter"):
        env[f"MASKLET_KAFKA__TOPICS__{name.upper()}"] = getattr(settings.topics, name)
    return subprocess.Popen([sys.executable, "-m", "masklet.deploy.kafka_cli", "run", "--checkpoint", "random",
                             "--image-size", "256", "--device", "cpu", "--backend", backend, "--overload", "pause",
                             "--bootstrap-servers", settings.bootstrap_servers, "--group-id", group],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_crash_and_resume_gives_every_frame_a_record(kafka_settings, consume_records, videos_dir):
    frames = clip_frames(videos_dir, "02_cups.mp4", 40)
    h, w = frames[0].shape[:2]
    first = _run_cli(kafka_settings, "crash")
    try:
        publish_frames(kafka_settings, "cups", frames, 0, 4)
        assert len(consume_records(kafka_settings, kafka_settings.topics.masklets, 1, 60)) >= 1
        prompt(kafka_settings, "cups", 6, (w / 4, h / 4, w / 2, h / 2))  # an object makes each frame slow
        # Only half the stream exists before the kill, so the kill is mid-stream however fast the run is.
        publish_frames(kafka_settings, "cups", frames, 4, 20)
        assert len(consume_records(kafka_settings, kafka_settings.topics.masklets, 10, 60)) >= 10
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    seen = {r.frame_idx for r in records_of(consume_records, kafka_settings, 40, 2)}
    assert len(seen) < 40, "the run finished before the kill; the test needs it mid-stream"
    publish_frames(kafka_settings, "cups", frames, 20, 40)

    # The restart runs on the CLI's default Ray backend: actors in their own processes.
    second = _run_cli(kafka_settings, "crash", backend="ray")
    try:
        deadline = time.monotonic() + 180  # generous: a loaded 2-core CI machine, Ray start-up included
        while time.monotonic() < deadline:
            records = records_of(consume_records, kafka_settings, 10**6, 1)
            if {r.frame_idx for r in records} >= set(range(40)):
                break
    finally:
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out  # a clean stop on SIGTERM
    assert "commits=" in out
    unique = {}
    for r in records:
        unique.setdefault(r.record_id, r)
    missing = sorted(set(range(40)) - {fi for _, fi in unique})
    assert not missing, f"no record for frames {missing}; the restarted run said:\n{out[-3000:]}"
    assert sorted(fi for _, fi in unique) == list(range(40))  # at least one each, exactly one after de-dup
    # The restarted run re-added the objects present in the stream's last record before its first
    # frame (which objects those are, random weights decide): check it against that record.
    said = re.search(r"resuming at frame (\d+) from its record of frame (\d+): objects \[([\d, ]*)\]", out)
    assert said, f"the restarted run resumed nothing; it said:\n{out[-3000:]}"
    first_new, source = int(said.group(1)), int(said.group(2))
    resumed = [int(v) for v in said.group(3).split(",") if v.strip()]
    assert source < first_new <= 20
    assert resumed == [o.object_id for o in unique[("cups", source)].objects if o.present and o.area > 0]
    after_crash = [r for r in records if r.frame_idx >= 20]  # published only after the restart
    assert all({o.object_id for o in r.objects} >= set(resumed) for r in after_crash)
    for r in records:  # a duplicate is the same frame's record again
        assert (r.width, r.height, r.pts) == (unique[r.record_id].width, unique[r.record_id].height,
                                              unique[r.record_id].pts)
