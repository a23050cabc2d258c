"""Where Kafka's added live latency goes (issue 11): each hop timed per frame, beside the same session
in-process, with the CPU every process used.

    .venv/bin/python bench/kafka_hops.py [--fps 2] [--frames 40] [--repeats 3] [--streams 1] [--profiles live]
                                         [--out bench/results/kafka_hops.json]

`--streams` cameras (default one; frames of every stream sent at the same instants), sam2.1_hiera_tiny (random weights) at 256 px on Ray actors, one object, real 720p JPEGs
of ../shared/videos/01_dog.mp4, as bench/kafka_bench.py runs its live paths (same camera and reader
child process, profile "live"). Per frame, on one clock (perf_counter is CLOCK_MONOTONIC, shared by
the processes of this machine):
  in_process:  submit -> output                          (LiveSession alone)
  kafka_<profile> (`--profiles`, each a `kafka.live.profile`, or PROFILE@MS: that profile with a fetch
               wait of MS ms, an experiment):
               send -> submit    (producer, broker, the runner's consumer and intake)
               submit -> publish (the session, then the runner's publisher thread hands it to the producer)
               publish -> arrival (producer, broker, the reader's consumer)
The paths alternate, `--repeats` times each. CPU seconds per process name over each trial (from
/proc) show what else runs beside the model on the 2 cores: the embedded broker (Tansu), the
runner's and the client's Kafka clients.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import kafka_bench as kb  # noqa: E402
from bench_common import cpu_by_process, git_commit, machine, percentile_ms  # noqa: E402
from masklet.actors.sources import open_source  # noqa: E402
from masklet.pipeline.kafka.broker import EmbeddedBroker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cpu_used(before: dict, after: dict) -> dict[str, float]:
    used: dict[str, float] = {}
    for pid, (seconds, name) in after.items():
        used[name] = used.get(name, 0.0) + seconds - before.get(pid, (0.0, ""))[0]
    return {name: round(s, 2) for name, s in sorted(used.items(), key=lambda kv: -kv[1]) if s >= 0.05}


def in_process(jpegs: list, fps: float, streams: list[str]) -> dict:
    from masklet.actors.messages import PromptMessage
    from masklet.actors.payloads import EncodedImage
    from masklet.pipeline.live import LiveConfig, LiveSession

    sent, latency = {}, {}

    def on_output(out) -> None:
        if out.record is not None and out.record.revision == 0:
            key = (out.record.stream_id, out.record.frame_idx)
            latency[key] = time.perf_counter() - sent[key]

    session = LiveSession(kb.backend(), kb.TINY, LiveConfig(queue_capacity=2), on_output=on_output)
    for sid in streams:
        session.open_stream(sid, 1280, 720)
        session.submit_prompt(PromptMessage(stream_id=sid, object_id=1, frame_idx=0, action="add", box=kb._box(1280, 720)))
    session.start()
    encoded = [EncodedImage(j, "image/jpeg", 1280, 720) for j in jpegs]
    for sid in streams:  # frame 0 warms the actors up; not timed (as for Kafka)
        sent[(sid, 0)] = time.perf_counter()
        session.submit_frame(sid, 0, 0.0, encoded[0])
    deadline = time.monotonic() + 180
    while not all((sid, 0) in latency for sid in streams) and time.monotonic() < deadline:
        time.sleep(0.01)

    def send(sid: str, i: int) -> None:
        sent[(sid, i)] = time.perf_counter()
        session.submit_frame(sid, i, i / fps, encoded[i])

    kb._paced(len(jpegs), fps, streams, lambda sid, i: i and send(sid, i))
    deadline = time.monotonic() + 120
    while not all((sid, len(jpegs) - 1) in latency for sid in streams) and time.monotonic() < deadline:
        time.sleep(0.02)
    batches = session.encoder_batch_sizes()
    session.shutdown()
    timed = [latency[(sid, i)] for sid in streams for i in range(1, len(jpegs)) if (sid, i) in latency]
    return {"frames": len(timed), "submit_to_output_p50_ms": percentile_ms(timed, 0.5), "submit_to_output_p99_ms": percentile_ms(timed, 0.99),
            "encoder_batches": batches}


def through_kafka(broker: EmbeddedBroker, frames: int, fps: float, trial: int, streams: list[str], path: str) -> dict:
    """`path`: a `kafka.live.profile`, or "PROFILE@MS", that profile with a fetch wait of MS (an experiment)."""
    from masklet.pipeline.kafka import client

    profile, _, wait = path.partition("@")
    saved = client.PROFILES[profile]
    if wait:
        kb.override_fetch_wait(profile, int(wait))
    try:
        return _through_kafka(broker, frames, fps, trial, streams, profile, int(wait or 0))
    finally:
        client.PROFILES[profile] = saved


def _through_kafka(broker: EmbeddedBroker, frames: int, fps: float, trial: int, streams: list[str], profile: str,
                   wait_ms: int) -> dict:
    from masklet.pipeline.kafka.run import KafkaRunner
    from masklet.pipeline.live import LiveConfig

    settings = kb.fresh_settings(broker, f"hops-{profile}-{trial}", profile)
    submitted, published = {}, {}

    def on_published(out) -> None:  # the runner's publisher thread, once the record is handed to the producer
        if out.record is not None and out.record.revision == 0:
            published[f"{out.record.stream_id}/{out.record.frame_idx}"] = time.perf_counter()

    runner = KafkaRunner(settings, kb.backend(), kb.TINY, LiveConfig(queue_capacity=2), overload="drop",
                         on_output=on_published)
    submit_frame = runner.session.submit_frame

    def timed_submit(stream_id, frame_idx, *args, **kwargs):
        submitted[f"{stream_id}/{frame_idx}"] = time.perf_counter()
        return submit_frame(stream_id, frame_idx, *args, **kwargs)

    runner.session.submit_frame = timed_submit  # the intake looks it up on the session at every frame
    batches: dict = {}
    shutdown = runner.session.shutdown

    def counted_shutdown(*args, **kwargs):  # the runner shuts its session down as it stops: count first
        batches.update(runner.session.encoder_batch_sizes())
        return shutdown(*args, **kwargs)

    runner.session.shutdown = counted_shutdown
    raw = kb.run_with_client(runner, {"bootstrap": broker.bootstrap_servers, "topics": settings.topics.model_dump(),
                                      "profile": profile, "fps": fps, "frames": frames, "streams": streams, "raw": True,
                                      "fetch_max_wait_ms": wait_ms})
    keys = [k for k in raw["sent"] if k in submitted and k in published]
    hops = {"end_to_end": [raw["arrived"][k] - raw["sent"][k] for k in keys],
            "send_to_submit": [submitted[k] - raw["sent"][k] for k in keys],
            "submit_to_publish": [published[k] - submitted[k] for k in keys],
            "publish_to_arrival": [raw["arrived"][k] - published[k] for k in keys]}
    return {"frames": len(keys), "dropped": raw["dropped"], "encoder_batches": batches,
            **{f"{hop}_{q}_ms": percentile_ms(values, p) for hop, values in hops.items() for q, p in (("p50", 0.5), ("p99", 0.99))},
            "send_to_submit_max_ms": percentile_ms(hops["send_to_submit"], 1.0),
            "publish_to_arrival_max_ms": percentile_ms(hops["publish_to_arrival"], 1.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=1, help="cameras, each at --fps")
    parser.add_argument("--profiles", default="live",
                        help="kafka.live.profile values to measure, comma-separated; PROFILE@MS: with a fetch wait of MS")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kafka_hops.json"))
    args = parser.parse_args()

    with open_source(str(kb.VIDEOS / "01_dog.mp4"), max_frames=args.frames) as source:
        jpegs = [kb.encode_jpeg(frame.rgb) for frame in source.frames()]
    streams = [f"cam{i}" for i in range(args.streams)]
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    paths = ["in_process"] + [f"kafka_{p}" for p in profiles]
    trials: dict[str, list] = {path: [] for path in paths}
    with EmbeddedBroker(port=0) as broker:
        for repeat in range(args.repeats):
            order = paths[repeat % len(paths):] + paths[:repeat % len(paths)]  # rotate: each path in every position
            for path in order:
                before = cpu_by_process()
                result = (in_process(jpegs, args.fps, streams) if path == "in_process" else
                          through_kafka(broker, args.frames, args.fps, repeat, streams, path.removeprefix("kafka_")))
                result["cpu_s"] = cpu_used(before, cpu_by_process())
                trials[path].append(result)
                print(f"{path} repeat {repeat}: {result}", flush=True)

    def median(path: str, key: str) -> float:
        return round(statistics.median(t[key] for t in trials[path]), 1)

    summary: dict = {"in_process": {k: median("in_process", k) for k in ("submit_to_output_p50_ms", "submit_to_output_p99_ms")}}
    for path in paths[1:]:
        kafka = summary[path] = {k: median(path, k) for k in trials[path][0] if k.endswith("_ms")}
        kafka["kafka_hops_p50_ms"] = round(kafka["send_to_submit_p50_ms"] + kafka["publish_to_arrival_p50_ms"], 1)
        kafka["session_slower_beside_kafka_p50_ms"] = round(kafka["submit_to_publish_p50_ms"]
                                                            - summary["in_process"]["submit_to_output_p50_ms"], 1)
        kafka["added_p50_ms"] = round(kafka["end_to_end_p50_ms"] - summary["in_process"]["submit_to_output_p50_ms"], 1)
    report = {"benchmark": "kafka_hops", "fps": args.fps, "frames": args.frames, "repeats": args.repeats,
              "streams": args.streams, "profiles": profiles, "commit": git_commit(),
              "model": f"sam2.1_hiera_tiny random weights, 256 px, cpu, ray actors, {args.streams} stream(s), 1 object each",
              "summary": summary, "trials": trials, "machine": machine()}
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
