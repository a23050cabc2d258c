"""What limits Kafka's added live latency on the embedded broker (issue 11): the CPU its idle polling
takes from the model, measured apart from any data path.

    .venv/bin/python bench/kafka_contention.py [--rounds 6]   # writes bench/results/kafka_contention.json

1. Idle cost: `masklet run` (KafkaRunner, the tests' fake model, in-process actors) with no records
   flowing, per latency profile: cores used by the runner's process and by the broker (Tansu) over
   15 s once the group has formed: `live` with its idle backoff off (its fetch wait, 50 ms since
   2026-12-07 and 20 ms in the committed results, however long the run is idle), then `live` and `throughput` once the backoff has set in
   (`idle_after_s` without a record: `idle_fetch_max_wait_ms`). Tansu holds an empty fetch for the whole `fetch_max_wait_ms`
   and a record waits for part of the fetch in progress, so the live profile's short wait buys
   latency with polling.
2. Contention: the same in-process LiveSession as bench/kafka_bench.py's baseline (1 stream at 2 fps,
   sam2.1_hiera_tiny random weights at 256 px on Ray actors, 24 frames of 01_dog.mp4), alone and
   beside Kafka's idle machinery only: the broker plus two consumers polling an empty topic with the
   live profile's fetch wait (as `masklet run`'s consumer and a masklets reader do), in a child
   process; and beside Kafka carrying one camera's traffic without the session (a 200 KB JPEG at
   2 fps, consumed by a stand-in for `masklet run` that produces a 2 KB record for each, read by a
   reader: `KAFKA_CLIENTS`). No record of the session goes through Kafka, so any difference is CPU
   taken from the model. Rotating order; medians, and each mode against "alone" of its round.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import kafka_bench as kb  # noqa: E402
from bench_common import git_commit, machine, process_cpu  # noqa: E402
from masklet.actors.sources import open_source  # noqa: E402
from masklet.pipeline.kafka.broker import EmbeddedBroker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Kafka's clients without the session, each consumer with Masklet's settings (the live profile's fetch wait:
# 50 ms since 2026-12-07, 20 ms in bench/results/kafka_contention.json).
# "idle": two consumers (as `masklet run`'s and a masklets reader) polling an empty topic. One 2-fps
# camera's traffic: "camera" (200 KB JPEGs at 2 fps, and the masklets reader) in one process,
# "runner" (a stand-in for `masklet run`: consume each frame, produce a 2 KB record) in another.
KAFKA_CLIENTS = r'''
import sys, threading, time
from kafka import KafkaConsumer, KafkaProducer
from masklet.pipeline.config import KafkaSettings
from masklet.pipeline.kafka.client import consumer_kwargs, producer_kwargs
boot, role, jpeg_file = sys.argv[1], sys.argv[2], sys.argv[3]
settings = KafkaSettings(bootstrap_servers=boot)  # Masklet's own client tuning, profile "live"
def consume(topic, group, each=None):
    consumer = KafkaConsumer(topic, **consumer_kwargs(settings.model_copy(update={"group_id": group})))
    while True:
        for batch in consumer.poll(timeout_ms=50).values():
            for record in batch:
                if each:
                    each(record)
if role == "idle":
    for group in ("runner", "reader"):
        threading.Thread(target=consume, args=("contention.idle", group), daemon=True).start()
    time.sleep(3600)
producer = KafkaProducer(**producer_kwargs(settings))
if role == "camera":
    threading.Thread(target=consume, args=("contention.masklets", "reader"), daemon=True).start()
    jpeg = open(jpeg_file, "rb").read()
    start = time.monotonic()
    for i in range(10**6):
        time.sleep(max(0.0, start + i / 2.0 - time.monotonic()))
        producer.send("contention.frames", jpeg, key=b"cam0")
else:
    record = b"{" + b"x" * 2000 + b"}"
    consume("contention.frames", "runner", lambda r: producer.send("contention.masklets", record, key=b"cam0"))
'''


def idle_cost(broker: EmbeddedBroker, profile: str, backoff: bool, seconds: float = 15.0) -> dict:
    from masklet.actors.backend import InProcessBackend
    from masklet.pipeline.kafka.run import KafkaRunner
    from masklet.pipeline.live import LiveConfig

    settings = kb.fresh_settings(broker, f"idle-{profile}", profile)
    runner = KafkaRunner(settings, InProcessBackend(), kb.FAKE, LiveConfig(queue_capacity=2))
    if not backoff:  # the profile's own fetch wait however long the run stays idle
        runner.profile = dataclasses.replace(runner.profile, idle_after_s=float("inf"))
    stop = threading.Event()
    loop = threading.Thread(target=runner.run, args=(stop.is_set,), daemon=True)
    loop.start()
    time.sleep(8 + (runner.profile.idle_after_s if backoff else 0))  # the group forms; the idle wait sets in
    me, tansu = os.getpid(), broker._process.pid  # noqa: SLF001
    (own0, _), (broker0, _) = process_cpu(me), process_cpu(tansu)
    time.sleep(seconds)
    (own1, _), (broker1, _) = process_cpu(me), process_cpu(tansu)
    stop.set()
    loop.join(60)
    return {"fetch_max_wait_ms": runner.fetch.fetch_wait_ms,
            "runner_process_cores": round((own1 - own0) / seconds, 3), "broker_cores": round((broker1 - broker0) / seconds, 3)}


def contention(broker: EmbeddedBroker, frames: list, rounds: int) -> dict:
    """The in-process session alone, beside idle Kafka polling, and beside Kafka carrying one camera's
    traffic (`KAFKA_CLIENTS`), in rotating order, `rounds` times each."""
    import tempfile

    from masklet.pipeline.kafka.codec import encode_jpeg

    broker.create_topics(["contention.idle", "contention.frames", "contention.masklets"])
    jpeg = Path(tempfile.mkdtemp(prefix="masklet-contention-")) / "frame.jpg"
    jpeg.write_bytes(encode_jpeg(frames[0]))
    beside = {"alone": [],
              "beside_idle_kafka": ["idle"], "beside_kafka_traffic": ["runner", "camera"]}  # KAFKA_CLIENTS roles
    modes = list(beside)
    runs: dict[str, list] = {mode: [] for mode in modes}
    for rnd in range(rounds):
        for mode in modes[rnd % len(modes):] + modes[:rnd % len(modes)]:
            children = [subprocess.Popen([sys.executable, "-c", KAFKA_CLIENTS, broker.bootstrap_servers, role, str(jpeg)])
                        for role in beside[mode]]
            if children:
                time.sleep(6)  # the consumers join and start polling
            try:
                result = kb.InProcess().trial(frames, 2.0, ["cam0"])
            finally:
                for child in children:
                    child.kill()
                    child.wait()
            runs[mode].append(result)
            print(f"  round {rnd} {mode}: {result}", flush=True)
    summary: dict = {mode: {"p50_ms": round(statistics.median(r["p50_ms"] for r in results), 1),
                            "p99_ms": round(statistics.median(r["p99_ms"] for r in results), 1), "trials": results}
                     for mode, results in runs.items()}
    for mode in modes[1:]:  # against "alone" of the same round
        summary[f"{mode}_added_p50_ms_per_round"] = [round(b["p50_ms"] - a["p50_ms"], 1)
                                                     for a, b in zip(runs["alone"], runs[mode])]
        summary[f"{mode}_added_p99_ms_per_round"] = [round(b["p99_ms"] - a["p99_ms"], 1)
                                                     for a, b in zip(runs["alone"], runs[mode])]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the three contention modes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kafka_contention.json")
    args = parser.parse_args()
    with open_source(str(kb.VIDEOS / "01_dog.mp4"), max_frames=24) as source:
        frames = [f.rgb for f in source.frames()]
    report = {"benchmark": "kafka_contention", "commit": git_commit(),
              "machine": {**machine(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}}
    with EmbeddedBroker(port=0) as broker:
        report["idle_cost"] = {f"{profile}{'' if backoff else ' (no idle backoff)'}": idle_cost(broker, profile, backoff)
                               for profile, backoff in (("live", False), ("live", True), ("throughput", True))}
        print("idle cost:", report["idle_cost"], flush=True)
        report["contention"] = contention(broker, frames, args.rounds)
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
