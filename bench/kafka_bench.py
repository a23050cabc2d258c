"""Kafka ingest throughput on the embedded broker, next to the same work without Kafka.

    .venv/bin/python bench/kafka_bench.py [--frames 150] [--repeat 4] [--out bench/results/kafka_bench.json]

Measures, on real 720p frames of ../shared/videos/01_dog.mp4:
  publish:      pre-encoded JPEG frames -> frames topic, until every record is acknowledged
  ingest:       `masklet ingest` end to end (PyAV decode + JPEG encode + publish + acks)
  no_kafka:     the same decode + JPEG encode with no broker (what Kafka adds is the difference)
  latency:      frames at a fixed rate -> `masklet run` (KafkaRunner, tiny at 256 px on CPU, one
                object) -> masklets topic; p50/p99 from the frame's send to its record's arrival
  max_rate:     the highest tried input rate with no frame dropped (queue_capacity 2, DROP_OLDEST)
Each of the last two sits next to the same LiveSession fed in-process, without Kafka ("in_process").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from masklet.pipeline.config import KafkaSettings  # noqa: E402
from masklet.pipeline.kafka.broker import EmbeddedBroker  # noqa: E402
from masklet.pipeline.kafka.client import crc32c_available, producer_kwargs  # noqa: E402
from masklet.pipeline.kafka.codec import encode_jpeg, frame_headers  # noqa: E402
from masklet.pipeline.kafka.ingest import ingest  # noqa: E402
from masklet.pipeline.kafka.producer import RecoveringProducer  # noqa: E402
from masklet.actors.sources import open_source  # noqa: E402
from masklet.actors.payloads import ModelSpec  # noqa: E402

TINY = ModelSpec("sam2.1_hiera_tiny", None, 256, "cpu")

VIDEOS = Path(os.environ.get("MASKLET_TEST_VIDEOS", REPO_ROOT.parent / "shared" / "videos"))


def _decode_and_encode(clip: Path, frames: int) -> tuple[list[bytes], float]:
    started = time.perf_counter()
    with open_source(str(clip), max_frames=frames) as source:
        jpegs = [encode_jpeg(frame.rgb) for frame in source.frames()]
    return jpegs, time.perf_counter() - started


def _publish(settings: KafkaSettings, jpegs: list[bytes], repeat: int) -> dict:
    producer = RecoveringProducer(producer_kwargs(settings))
    sent_bytes, count = 0, 0
    started = time.perf_counter()
    for round_idx in range(repeat):
        for idx, value in enumerate(jpegs):
            frame_idx = round_idx * len(jpegs) + idx
            producer.send(settings.topics.frames, value=value, key=b"bench",
                          headers=frame_headers(frame_idx, frame_idx / 30, 1280, 720))
            sent_bytes += len(value)
            count += 1
    report = producer.close(timeout=120)
    elapsed = time.perf_counter() - started
    assert report.complete, report.summary()
    return {"frames": count, "bytes": sent_bytes, "seconds": round(elapsed, 3),
            "frames_per_s": round(count / elapsed, 1), "mb_per_s": round(sent_bytes / 1e6 / elapsed, 1)}


def _percentiles(values: list[float]) -> dict:
    import numpy as np

    arr = np.asarray(values) * 1000
    return {"frames": len(values), "p50_ms": round(float(np.percentile(arr, 50)), 1),
            "p99_ms": round(float(np.percentile(arr, 99)), 1)}


def _paced(frames: list, fps: float, send) -> None:
    start = time.perf_counter()
    for i, rgb in enumerate(frames):
        delay = start + i / fps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(i, rgb)


def _live_in_process(frames: list, fps: float, sid: str, queue_capacity: int) -> dict:
    """The LiveSession alone: submit at `fps`, poll between; latency = submit -> output."""
    from masklet.actors.backend import InProcessBackend
    from masklet.pipeline.live import LiveConfig, LiveSession
    from masklet.actors.messages import PromptMessage

    sent, latencies = {}, []
    # The session's own driver thread does the work, as the Kafka runner's loop does; the caller
    # only submits at the input rate (polling from the sender would pace the input by the model).
    ses = LiveSession(InProcessBackend(), TINY, LiveConfig(queue_capacity=queue_capacity),
                      on_output=lambda o: latencies.append(time.perf_counter() - sent[o.record.frame_idx]))
    h, w = frames[0].shape[:2]
    ses.open_stream(sid, w, h)
    ses.submit_prompt(PromptMessage(stream_id=sid, object_id=1, frame_idx=1, action="add",
                                    box=(w / 4, h / 4, w / 2, h / 2)))
    ses.start()

    def send(i, rgb):
        sent[i] = time.perf_counter()
        ses.submit_frame(sid, i, i / fps, rgb)

    _paced(frames, fps, send)
    deadline = time.monotonic() + 60
    while ses.status(sid).lag_frames and time.monotonic() < deadline:
        time.sleep(0.02)
    dropped = ses.status(sid).frames_dropped
    ses.shutdown()
    return {**_percentiles(latencies), "dropped": dropped}


class _KafkaPath:
    """One KafkaRunner (in-process actors) in a thread plus a reader of the masklets topic."""

    def __init__(self, settings: KafkaSettings, queue_capacity: int) -> None:
        import threading

        from kafka import KafkaConsumer, TopicPartition

        from masklet.actors.backend import InProcessBackend
        from masklet.pipeline.kafka.client import consumer_kwargs, topic_partitions
        from masklet.pipeline.kafka.run import KafkaRunner
        from masklet.pipeline.live import LiveConfig

        self.settings = settings
        self.runner = KafkaRunner(settings, InProcessBackend(), TINY, LiveConfig(queue_capacity=queue_capacity),
                                  overload="drop")
        self.stop = threading.Event()
        self.arrived: dict[tuple[str, int], tuple[float, int]] = {}
        self.consumer = KafkaConsumer(**consumer_kwargs(settings, group=False))
        ids = topic_partitions(self.consumer, settings.topics.masklets)
        if not ids:
            raise RuntimeError(f"topic {settings.topics.masklets} has no partitions")
        parts = [TopicPartition(settings.topics.masklets, p) for p in ids]
        self.consumer.assign(parts)
        self.threads = [threading.Thread(target=self.runner.run, args=(self.stop.is_set,), daemon=True),
                        threading.Thread(target=self._read, daemon=True)]
        for t in self.threads:
            t.start()
        self.producer = RecoveringProducer(producer_kwargs(settings, linger_ms=0))

    def _read(self) -> None:
        import json as _json

        while not self.stop.is_set():
            for batch in self.consumer.poll(timeout_ms=20).values():
                now = time.perf_counter()
                for r in batch:
                    rec = _json.loads(r.value)
                    self.arrived[(rec["stream_id"], rec["frame_idx"])] = (now, rec["dropped_frames_since_last"])

    def trial(self, frames: list, fps: float, sid: str) -> dict:
        from masklet.actors.messages import PromptMessage

        h, w = frames[0].shape[:2]
        jpegs = [encode_jpeg(f) for f in frames]
        key, sent = sid.encode(), {}

        def send(i, _rgb):
            sent[i] = time.perf_counter()
            self.producer.send(self.settings.topics.frames, jpegs[i], key=key, headers=frame_headers(i, i / fps, w, h))

        send(0, None)
        while sid not in self.runner.session.streams():
            time.sleep(0.01)
        msg = PromptMessage(stream_id=sid, object_id=1, frame_idx=1, action="add", box=(w / 4, h / 4, w / 2, h / 2))
        self.producer.send(self.settings.topics.prompts, msg.to_json_bytes(), key=key)
        time.sleep(0.3)
        _paced(frames[1:], fps, lambda i, rgb: send(i + 1, rgb))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = {i: v for (s, i), v in self.arrived.items() if s == sid}
            if len(frames) - 1 in got:
                break
            time.sleep(0.05)
        latencies = [t - sent[i] for i, (t, _) in got.items()]
        return {**_percentiles(latencies), "dropped": sum(d for _, d in got.values())}

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        self.consumer.close()
        self.producer.close(10)


def _live_benchmarks(settings: KafkaSettings, frames: list, latency_fps: float, rates: list[float]) -> dict:
    out = {"model": "sam2.1_hiera_tiny random weights, image_size 256, cpu, in-process actors, 1 object",
           "latency": {"input_fps": latency_fps, "frames": len(frames)}, "max_rate": {"queue_capacity": 2}}
    out["latency"]["in_process"] = _live_in_process(frames, latency_fps, "lat", 8)
    kafka = _KafkaPath(settings, 2)
    try:
        out["latency"]["kafka"] = kafka.trial(frames, latency_fps, "lat")
        for path, run in (("in_process", lambda r, sid: _live_in_process(frames, r, sid, 2)),
                          ("kafka", lambda r, sid: kafka.trial(frames, r, sid))):
            trials, best = {}, None
            for rate in rates:
                trials[str(rate)] = result = run(rate, f"rate-{path}-{rate}")
                if result["dropped"]:
                    break
                best = rate
            out["max_rate"][path] = {"fps_without_drops": best, "trials": trials}
    finally:
        kafka.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=4, help="publish the decoded frames this many times")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "kafka_bench.json"))
    parser.add_argument("--live-frames", type=int, default=24, help="frames per latency/rate trial")
    parser.add_argument("--latency-fps", type=float, default=2.0)
    parser.add_argument("--rates", default="2,3,4,6", help="input rates (fps) tried for max_rate, ascending")
    args = parser.parse_args()
    clip = VIDEOS / "01_dog.mp4"

    jpegs, no_kafka_s = _decode_and_encode(clip, args.frames)
    results = {
        "clip": clip.name, "resolution": "1280x720", "jpeg_quality": 90,
        "mean_jpeg_bytes": round(sum(map(len, jpegs)) / len(jpegs)),
        "crc32c": crc32c_available(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "no_kafka": {"frames": len(jpegs), "seconds": round(no_kafka_s, 3),
                     "frames_per_s": round(len(jpegs) / no_kafka_s, 1)},
    }
    with EmbeddedBroker(port=0) as broker:
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        results["publish"] = _publish(settings, jpegs, args.repeat)
        report = ingest(str(clip), "bench-ingest", settings, max_frames=args.frames)
        assert report.delivery.complete, report.summary()
        results["ingest"] = {"frames": report.frames_sent, "bytes": report.bytes_sent,
                             "seconds": round(report.elapsed_s, 3), "frames_per_s": round(report.frames_per_s, 1),
                             "mb_per_s": round(report.mb_per_s, 1)}
        with open_source(str(clip), max_frames=args.live_frames) as source:
            frames = [f.rgb for f in source.frames()]
        results["live"] = _live_benchmarks(settings, frames, args.latency_fps,
                                           [float(r) for r in args.rates.split(",")])
    results["kafka_overhead_per_frame_ms"] = round(
        1000 * (results["ingest"]["seconds"] / results["ingest"]["frames"] - no_kafka_s / len(jpegs)), 2)
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
