"""Kafka ingest throughput on the embedded broker, next to the same work without Kafka.

    .venv/bin/python bench/kafka_bench.py [--frames 150] [--repeat 4] [--out bench/results/kafka_bench.json]

Measures, on real 720p frames of ../shared/videos/01_dog.mp4:
  publish:      pre-encoded JPEG frames -> frames topic, until every record is acknowledged
  ingest:       `masklet ingest` end to end (PyAV decode + JPEG encode + publish + acks)
  no_kafka:     the same decode + JPEG encode with no broker (what Kafka adds is the difference)
End-to-end latency through `masklet run` is not measured yet: `run` is not built (see
pipeline/kafka/README.md).
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

from pipeline.config import KafkaSettings  # noqa: E402
from pipeline.kafka.broker import EmbeddedBroker  # noqa: E402
from pipeline.kafka.client import crc32c_available, producer_kwargs  # noqa: E402
from pipeline.kafka.codec import encode_jpeg, frame_headers  # noqa: E402
from pipeline.kafka.ingest import ingest  # noqa: E402
from pipeline.kafka.producer import RecoveringProducer  # noqa: E402
from pipeline.sources import open_source  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=4, help="publish the decoded frames this many times")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "kafka_bench.json"))
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
    results["kafka_overhead_per_frame_ms"] = round(
        1000 * (results["ingest"]["seconds"] / results["ingest"]["frames"] - no_kafka_s / len(jpegs)), 2)
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
