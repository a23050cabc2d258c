"""What limits Kafka's added live latency on the embedded broker (issue 11): the CPU its idle polling
takes from the model, measured apart from any data path.

    .venv/bin/python bench/kafka_contention.py [--pairs 3]   # writes bench/results/kafka_contention.json

1. Idle cost: `masklet run` (KafkaRunner, the tests' fake model, in-process actors) with no records
   flowing, per latency profile: cores used by the runner's process and by the broker (Tansu) over
   15 s once the group has formed: `live` with its idle backoff off (its 20 ms fetch wait however
   long the run is idle), then `live` and `throughput` once the backoff has set in
   (`idle_after_s` without a record: `idle_fetch_max_wait_ms`). Tansu holds an empty fetch for the whole `fetch_max_wait_ms`
   and a record waits for the fetch in progress to end, so the live profile's short wait buys
   latency with polling.
2. Contention: the same in-process LiveSession as bench/kafka_bench.py's baseline (1 stream at 2 fps,
   sam2.1_hiera_tiny random weights at 256 px on Ray actors, 24 frames of 01_dog.mp4), alone and
   beside Kafka's idle machinery only: the broker plus two consumers polling an empty topic with the
   live profile's fetch wait (as `masklet run`'s consumer and a masklets reader do), in a child
   process. No record goes through Kafka, so any difference is CPU taken from the model. Alternating
   pairs; medians.
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
from bench_common import machine, process_cpu  # noqa: E402
from masklet.actors.sources import open_source  # noqa: E402
from masklet.pipeline.config import KafkaSettings, KafkaTopics  # noqa: E402
from masklet.pipeline.kafka.broker import EmbeddedBroker  # noqa: E402
from masklet.pipeline.kafka.client import PROFILES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IDLE_CONSUMERS = r'''
import sys, threading, time
from kafka import KafkaConsumer
boot, topic, wait_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])
def run(group):
    consumer = KafkaConsumer(topic, bootstrap_servers=boot, group_id=group, fetch_max_wait_ms=wait_ms)
    while True:
        consumer.poll(timeout_ms=50)
for group in ("runner", "reader"):
    threading.Thread(target=run, args=(group,), daemon=True).start()
time.sleep(3600)
'''


def idle_cost(broker: EmbeddedBroker, profile: str, backoff: bool, seconds: float = 15.0) -> dict:
    from masklet.actors.backend import InProcessBackend
    from masklet.pipeline.kafka.run import KafkaRunner
    from masklet.pipeline.live import LiveConfig

    prefix = f"idle-{profile}-{int(time.time())}"
    topics = KafkaTopics(frames=f"{prefix}.frames", prompts=f"{prefix}.prompts", masklets=f"{prefix}.masklets",
                         deadletter=f"{prefix}.deadletter")
    broker.create_topics([topics.frames, topics.prompts, topics.masklets, topics.deadletter])
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topics=topics, group_id=prefix,
                             live={"profile": profile})
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


def contention(broker: EmbeddedBroker, frames: list, pairs: int) -> dict:
    broker.create_topics(["contention.idle"])
    runs: dict[str, list] = {"alone": [], "beside_idle_kafka": []}
    for pair in range(pairs):
        for mode in ("alone", "beside_idle_kafka") if pair % 2 == 0 else ("beside_idle_kafka", "alone"):
            child = None
            if mode == "beside_idle_kafka":
                child = subprocess.Popen([sys.executable, "-c", IDLE_CONSUMERS, broker.bootstrap_servers, "contention.idle",
                                          str(PROFILES["live"].fetch_max_wait_ms)])
                time.sleep(5)  # the consumers join and start polling
            try:
                result = kb.InProcess().trial(frames, 2.0, ["cam0"])
            finally:
                if child is not None:
                    child.kill()
                    child.wait()
            runs[mode].append(result)
            print(f"  pair {pair} {mode}: {result}", flush=True)
    summary = {mode: {"p50_ms": round(statistics.median(r["p50_ms"] for r in results), 1),
                      "p99_ms": round(statistics.median(r["p99_ms"] for r in results), 1), "trials": results}
               for mode, results in runs.items()}
    summary["added_p50_ms_per_pair"] = [round(b["p50_ms"] - a["p50_ms"], 1)
                                        for a, b in zip(runs["alone"], runs["beside_idle_kafka"])]
    summary["added_p99_ms_per_pair"] = [round(b["p99_ms"] - a["p99_ms"], 1)
                                        for a, b in zip(runs["alone"], runs["beside_idle_kafka"])]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kafka_contention.json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    with open_source(str(kb.VIDEOS / "01_dog.mp4"), max_frames=24) as source:
        frames = [f.rgb for f in source.frames()]
    report = {"benchmark": "kafka_contention", "commit": commit,
              "machine": {**machine(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}}
    with EmbeddedBroker(port=0) as broker:
        report["idle_cost"] = {f"{profile}{'' if backoff else ' (no idle backoff)'}": idle_cost(broker, profile, backoff)
                               for profile, backoff in (("live", False), ("live", True), ("throughput", True))}
        print("idle cost:", report["idle_cost"], flush=True)
        report["contention"] = contention(broker, frames, args.pairs)
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
