"""The live half of `make demo`: the sample clip as a live stream through the embedded Kafka broker.

    broker (embedded Tansu, memory-only, loopback) <- `masklet prompt` (sent before any frame)
                                                   <- `masklet ingest CLIP --realtime`
    `masklet run` (in this process: KafkaRunner + /metrics) -> masklets topic -> read back here

Offline, with random weights like the smoke run before it, and as loud about it. The prompt is
sent before the first frame on purpose: the run applies it from the frame it names (cross-topic
order), and frames the run cannot keep up with are dropped and reported, as a live source is.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Optional

DEMO_MODEL = "sam2.1_hiera_tiny"  # the demo's variant (deploy/demo.py imports it from here)

LIVE_STREAM = "demo-cam"
LIVE_FRAMES = 24  # 1 s of the 24 fps clip at its own pace: the live part stays a few seconds


def _read_back(settings, expected: int, timeout_s: float) -> list:
    """The stream's masklet records until every frame is accounted for (published or reported dropped)."""
    from kafka import KafkaConsumer, TopicPartition

    from masklet.actors.messages import MaskletRecord
    from masklet.pipeline.kafka.client import consumer_kwargs, topic_partitions

    consumer = KafkaConsumer(**consumer_kwargs(settings, group=False))
    topic = settings.topics.masklets
    consumer.assign([TopicPartition(topic, p) for p in topic_partitions(consumer, topic)])
    records: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=100).values():
                for message in batch:
                    record = MaskletRecord.from_json_bytes(message.value)
                    key = record.frame_idx
                    if record.stream_id == LIVE_STREAM and record.revision >= getattr(records.get(key), "revision", -1):
                        records[key] = record  # a consumer keeps the highest revision per frame
            dropped = sum(r.dropped_frames_since_last + r.lost_frames_since_last for r in records.values())
            if records and max(records) == expected - 1 and len(records) + dropped >= expected:
                break
    finally:
        consumer.close()
    return [records[k] for k in sorted(records)]


def run_live_demo(clip: Path, out: Path, *, checkpoint: Optional[str], image_size: int,
                  point: tuple[int, int], click_frame: int, smoke: bool) -> int:
    from masklet.actors.backend import InProcessBackend
    from masklet.actors.payloads import ModelSpec
    from masklet.monitoring.exporter import start_metrics_server
    from masklet.pipeline.config import KafkaSettings
    from masklet.pipeline.kafka.broker import EmbeddedBroker
    from masklet.pipeline.kafka.ingest import ingest
    from masklet.pipeline.kafka.prompts import build_prompt, publish_prompt
    from masklet.pipeline.kafka.run import KafkaRunner
    from masklet.pipeline.live import LiveConfig

    print("\nmasklet demo: LIVE PATH: the clip as a live stream through the embedded Kafka broker", flush=True)
    if smoke:
        print("masklet demo: RANDOM WEIGHTS here too: the live masks are MEANINGLESS (a pipeline check)", flush=True)
    with EmbeddedBroker(port=0) as broker:
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        servers = f"--bootstrap-servers {broker.bootstrap_servers}"
        model = ModelSpec(DEMO_MODEL, checkpoint, image_size, "cpu")
        runner = KafkaRunner(settings, InProcessBackend(), model, LiveConfig(queue_capacity=4), overload="drop")
        metrics = start_metrics_server(runner.stats_snapshot, port=0)
        stop = threading.Event()
        thread = threading.Thread(target=runner.run, args=(stop.is_set,), name="masklet-run", daemon=True)
        thread.start()
        weights = "random" if checkpoint is None else checkpoint
        print("masklet demo: doing what these commands do (each in its own terminal):\n"
              f"  masklet broker --port {broker.port}\n"
              f"  masklet run --checkpoint {weights} --image-size {image_size} --backend inprocess {servers}\n"
              f"  masklet prompt --stream {LIVE_STREAM} --object 1 --point {point[0]},{point[1]} --frame {click_frame} {servers}\n"
              f"  masklet ingest {clip} --stream {LIVE_STREAM} --realtime --max-frames {LIVE_FRAMES} {servers}",
              flush=True)
        print(f"masklet demo: metrics (while the demo runs): {metrics.url}", flush=True)
        try:
            prompt = build_prompt(LIVE_STREAM, 1, frame_idx=click_frame, points=[point])
            if not publish_prompt(prompt, settings).complete:
                print("masklet demo: the prompt was not acknowledged by the broker")
                return 1
            report = ingest(str(clip), LIVE_STREAM, settings, realtime=True, max_frames=LIVE_FRAMES)
            records = _read_back(settings, report.frames_sent, timeout_s=120)
        finally:
            stop.set()
            thread.join(60)
            metrics.close()
    live_dir = out / "live"
    live_dir.mkdir(parents=True, exist_ok=True)
    path = live_dir / "masklets.jsonl"
    path.write_text("".join(json.dumps(r.model_dump(mode="json", by_alias=True)) + "\n" for r in records))
    with_object = [r.frame_idx for r in records if any(o.object_id == 1 for o in r.objects)]
    dropped = sum(r.dropped_frames_since_last for r in records)
    print(f"masklet demo: {report.frames_sent} frames sent, {len(records)} masklet records read back "
          f"({dropped} frames dropped by the live queue and reported in the records); object 1 in "
          f"{len(with_object)} of them, from frame {with_object[0] if with_object else '-'} "
          f"(its prompt named frame {click_frame} and was sent before the first frame)")
    print(f"masklet demo: live records in {path}")
    print("masklet demo: the web console and HTTP API, with `masklet broker` running:\n"
          "  export MASKLET_API_TOKEN=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))')\n"
          f"  MASKLET_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092 masklet serve --kafka --checkpoint {weights}\n"
          "  then open http://127.0.0.1:8000/ and paste the token (masklet serve prints one if none is set)")
    return 0 if records else 1
