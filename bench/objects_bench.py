"""Objects as rows: what the pipeline itself costs, per frame and per object (issue "objects as rows").

    .venv/bin/python bench/objects_bench.py [--only ceiling,objects,archive,real,publish]

Every ratio is measured side by side in this one run, on this machine:
  ceiling  A null model (SAM 2's API, no compute: masklet.model.null_model) through the Ray pipeline,
           2 streams x 8 objects of the shared 720p clips, vs ONE process doing the least work per
           frame: PyAV decode, then per object a full-resolution mask -> pycocotools RLE, toBbox, area
           and JSON. Steady-state frames/s between the records at 30% and 90% (by the first record the
           stages already hold a queue of frames: timing from it flattered deeper queues) and start-up
           (to the first record); the engine with its old, smaller rounds runs beside for comparison,
           and so does the loop with one decode thread (by default PyAV decodes and converts to RGB
           on as many threads as there are cores, so "one process" keeps ~1.3 cores busy).
           Goals: >= 1.5x the loop on 2 cores, start-up <= 5 s whatever the object count.
  objects  `masklet segment` (subprocess) on one clip, 20 frames, tiny at 256 px (random weights) with
           1, 8 and 32 objects: peak PSS of the whole process tree (CLI + Ray), wall time, time to the
           first record, tracker processes. Goal: <= 25 MB and <= 0.1 s of start-up per extra object.
  archive  20 clips of 30 frames (cut from the shared clips), 2 objects each, `masklet segment DIR`
           vs the same model calls in a plain loop. Goal: >= 0.9.
  real     2 streams x 4 objects, tiny at 256 px, 30 frames: the Ray pipeline vs a plain loop. Goal >= 1.0.
  publish  Publishing cost per object per 720p frame (low-res logits -> RLE, bbox, area, record JSON),
           on masks of the real model, vs full-resolution upsampling + pycocotools + np.nonzero.
           Target <= 1.5 ms.
Writes bench/results/objects_bench.json with the machine described.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_common import clips, machine, plain_loop, tree_cpu_s  # noqa: E402
from memory_probe import MemorySampler  # noqa: E402

from masklet.actors.backend import RayBackend  # noqa: E402
from masklet.actors.payloads import ModelSpec  # noqa: E402
from masklet.actors.sinks import JsonlOutputs  # noqa: E402
from masklet.actors.sources import open_source  # noqa: E402
from masklet.model.types import Prompt  # noqa: E402
from masklet.pipeline.engine import Engine, StreamSpec  # noqa: E402
from masklet.pipeline.engine_types import EngineConfig  # noqa: E402
from masklet.pipeline.executor_config import ExecutorConfig  # noqa: E402

NULL = ModelSpec("null", None, 256, "cpu", factory="masklet.model.null_model:build_null_model")
TINY = ModelSpec("sam2.1_hiera_tiny", None, 256, "cpu")


def object_points(n: int, width: int = 1280, height: int = 720) -> list[tuple[float, float]]:
    """n prompt points spread over a grid of the frame."""
    cols = int(np.ceil(np.sqrt(n)))
    return [((i % cols + 0.5) * width / cols, (i // cols + 0.5) * height / cols) for i in range(n)]


def objects_for(n: int) -> dict:
    return {i + 1: {0: Prompt(points=[list(p)], labels=[1])} for i, p in enumerate(object_points(n))}


# -- ceiling ---------------------------------------------------------------------------------------


def least_work_loop(paths, n_objects: int, frames: int, threads: int | None = None) -> dict:
    """One process, the least work per frame: decode, then per object RLE/bbox/area/JSON of a
    full-resolution mask (the same blob masks the null model's trackers give). `threads`: PyAV's
    decode and RGB-conversion threads (None: its default, as many as there are cores)."""
    from pycocotools import mask as coco

    from masklet.actors.masks import upsample_logits
    from masklet.actors.sources import set_decode_threads
    from masklet.model.null_model import NullModel

    model = NullModel(image_size=NULL.image_size)
    masks = []
    for x, y in object_points(n_objects):
        t = model.new_tracker((720, 1280))
        low = t.step(0, None, Prompt(points=[[x, y]], labels=[1])).low_res_logits[0].numpy()
        masks.append(upsample_logits(low, (720, 1280)) > 0)
    own_cpu = lambda: sum(os.times()[:2])  # noqa: E731 - the loop is this one process (its decode threads included)
    saved = set_decode_threads(threads)
    try:
        start, count, cpu_start = time.perf_counter(), 0, own_cpu()
        for path in paths:
            with open_source(str(path), max_frames=frames) as source:
                for frame in source.frames():
                    objects = []
                    for oid, mask in enumerate(masks, 1):
                        rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
                        bbox = [int(v) for v in coco.toBbox(rle)]
                        objects.append({"object_id": oid, "rle": {"size": [720, 1280], "counts": rle["counts"].decode()},
                                        "bbox": bbox, "area": int(coco.area(rle)), "score": 1.0, "iou": 0.9})
                    json.dumps({"stream_id": path.stem, "frame_idx": frame.frame_idx, "objects": objects}).encode()
                    count += 1
        wall = time.perf_counter() - start
        cpu_ms = (own_cpu() - cpu_start) * 1000 / count
    finally:
        set_decode_threads(saved)
    return {"frames": count, "wall_s": round(wall, 2), "fps": round(count / wall, 2), "cpu_ms_per_frame": round(cpu_ms, 2),
            "cores_busy": round(cpu_ms * count / 1000 / wall, 2)}


def pipeline(model: ModelSpec, paths, objects: dict, frames: int, out: Path, engine: dict | None = None,
             **executor) -> dict:
    """The Ray engine on the clips. Steady state is timed between two records, at 30% and 90% of
    them: by the first record the stages already hold a queue's worth of decoded and encoded frames,
    so timing from there would credit deeper queues with work done before the clock started."""
    marks: dict = {}
    expected = frames * len(paths)
    window = (max(2, int(0.3 * expected)), int(0.9 * expected))

    def progress(outcome):
        now = time.perf_counter()
        marks.setdefault("first", now)
        marks["published"] = marks.get("published", 0) + 1
        for name, at in zip(("from", "to"), window):
            if marks["published"] == at:  # CPU is read while every actor is still up
                marks[name], marks[f"cpu_{name}"] = now, tree_cpu_s()

    # The executor settings every command uses by default (pipeline.max_batch_size 8, max_wait_ms 10)
    config = EngineConfig(executor=ExecutorConfig(**executor), **(engine or {}))
    backend = RayBackend(init_kwargs={"num_cpus": os.cpu_count()})
    try:
        start = time.perf_counter()
        engine_ = Engine(backend, model, config, on_progress=progress)
        specs = [StreamSpec(p.stem, functools.partial(open_source, str(p), max_frames=frames), objects,
                            JsonlOutputs(str(out)), bidirectional=False) for p in paths]
        report = engine_.run(specs)
        wall = time.perf_counter() - start
        engine_.shutdown()
    finally:
        backend.shutdown()
    total = sum(o.frames_published for o in report.streams.values())
    timed = "to" in marks
    span = window[1] - window[0]
    steady = span / (marks["to"] - marks["from"]) if timed else 0.0
    # every process of the session (driver, raylet, GCS, each actor) over the same window
    cpu_ms = (marks["cpu_to"] - marks["cpu_from"]) * 1000 / span if timed else None
    return {"frames": total, "wall_s": round(wall, 2), "startup_s": round(marks["first"] - start, 2),
            "steady_window": list(window), "cpu_ms_per_frame": None if cpu_ms is None else round(cpu_ms, 2),
            "executor": {"max_batch_size": config.executor.max_batch_size, "max_wait_ms": config.executor.max_wait_ms},
            "engine": {"decode_chunk": config.decode_chunk, "queue_capacity": config.queue_capacity},
            "steady_fps": round(steady, 2), "fps_overall": round(total / wall, 2),
            "failed": {k: o.error for k, o in report.streams.items() if not o.ok},
            "tracker_processes": len([n for n in report.actors if n.startswith("tracker")]),
            "tracker_batch_sizes": {str(k): v for k, v in sorted(report.tracker_batch_sizes.items())},
            "encoder_batch_sizes": {str(k): v for k, v in sorted(report.batch_sizes.items())}}


# The file engine's round sizes before they grew (EngineConfig.decode_chunk 4, queue_capacity 16), run
# beside the defaults so the JSON shows what the larger rounds buy, measured in the same session.
SMALL_ROUNDS = {"decode_chunk": 4, "queue_capacity": 16}


def bench_ceiling(paths, scratch: Path, frames: int, repeats: int = 5) -> dict:
    """Loop, pipeline (defaults) and pipeline (SMALL_ROUNDS) alternate, `repeats` times each; ratios
    are of the medians (one run's steady window is a few seconds, and this shared VM's runs vary by
    +-15%). CPU per frame (every process of each side, /proc) is reported beside: it says where the
    time goes, and 2 cores' worth of it bounds what the pipeline could reach."""
    loops, singles, pipes, smalls = [], [], [], []
    for r in range(repeats):
        loops.append(least_work_loop(paths, 8, frames))
        singles.append(least_work_loop(paths, 8, frames, threads=1))
        pipes.append(pipeline(NULL, paths, objects_for(8), frames, scratch / f"ceiling-{r}"))
        smalls.append(pipeline(NULL, paths, objects_for(8), frames, scratch / f"ceiling-small-{r}",
                               engine=SMALL_ROUNDS))
        print(f"  repeat {r}: loop {loops[-1]['fps']} frames/s ({loops[-1]['cores_busy']} cores busy; one thread: "
              f"{singles[-1]['fps']}), pipeline steady {pipes[-1]['steady_fps']} "
              f"frames/s (small rounds {smalls[-1]['steady_fps']}), start-up {pipes[-1]['startup_s']} s", flush=True)

    def median(runs, key):
        return float(np.median([x[key] for x in runs if x[key] is not None]))

    loop_fps, steady, small = median(loops, "fps"), median(pipes, "steady_fps"), median(smalls, "steady_fps")
    startup = median(pipes, "startup_s")
    ratio = steady / loop_fps
    loop_cpu, pipe_cpu = median(loops, "cpu_ms_per_frame"), median(pipes, "cpu_ms_per_frame")
    small_cpu = median(smalls, "cpu_ms_per_frame")
    single_fps, single_cpu = median(singles, "fps"), median(singles, "cpu_ms_per_frame")
    loop_cores = median(loops, "cores_busy")
    print(f"least-work loop: {loop_fps} frames/s; null-model pipeline: steady {steady} frames/s, start-up "
          f"{startup} s -> {ratio:.2f}x the loop (goal >= 1.5x, start-up <= 5 s); medians of {repeats}. "
          f"CPU per frame: loop {loop_cpu} ms, pipeline {pipe_cpu} ms (2 cores fully used would give "
          f"{2 * loop_cpu / pipe_cpu:.2f}x). Small rounds {SMALL_ROUNDS}: {small} frames/s "
          f"({small / loop_fps:.2f}x), {small_cpu} ms CPU per frame. The loop keeps {loop_cores} cores busy (PyAV's "
          f"decode and conversion threads); with one thread it runs {single_fps} frames/s ({single_cpu} ms CPU per "
          f"frame): the pipeline is {steady / single_fps:.2f}x that")
    return {"loop": loops[0], "pipeline": pipes[0], "loop_fps_runs": [x["fps"] for x in loops],
            "loop_cpu_ms_per_frame_runs": [x["cpu_ms_per_frame"] for x in loops],
            "pipeline_cpu_ms_per_frame_runs": [p["cpu_ms_per_frame"] for p in pipes],
            "two_core_bound_ratio": round(2 * loop_cpu / pipe_cpu, 3),
            "steady_fps_runs": [p["steady_fps"] for p in pipes], "startup_s_runs": [p["startup_s"] for p in pipes],
            "loop_fps_median": loop_fps, "steady_fps_median": steady, "startup_s_median": startup,
            "ratio": round(ratio, 3), "loop_cores_busy_median": loop_cores,
            "one_thread_loop": {"fps_runs": [x["fps"] for x in singles],
                                "cpu_ms_per_frame_runs": [x["cpu_ms_per_frame"] for x in singles],
                                "fps_median": single_fps, "cpu_ms_per_frame_median": single_cpu,
                                "pipeline_ratio": round(steady / single_fps, 3)},
            "small_rounds": {"engine": SMALL_ROUNDS, "steady_fps_runs": [p["steady_fps"] for p in smalls],
                             "cpu_ms_per_frame_runs": [p["cpu_ms_per_frame"] for p in smalls],
                             "steady_fps_median": small, "cpu_ms_per_frame_median": small_cpu,
                             "ratio": round(small / loop_fps, 3)}}


# -- cost per object ---------------------------------------------------------------------------------


def segment_command(inputs: list[str], out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "masklet.deploy.cli", "segment", *inputs, "--out", str(out), "--no-preview",
            "--no-mask-videos", "--checkpoint", "random", *extra]


def segment_cli(inputs: list[str], out: Path, extra: list[str]) -> dict:
    """`masklet segment` in a subprocess: wall time, time to its first record, peak PSS of the tree."""
    cmd = segment_command(inputs, out, extra)
    first = {}

    def records() -> int:
        files = list(out.glob("*/masklets.jsonl"))
        n = sum(f.read_bytes().count(b"\n") for f in files if f.exists())
        if n and "t" not in first:
            first["t"] = time.perf_counter()
        return n

    start = time.perf_counter()
    with MemorySampler(records, interval_s=0.5) as sampler:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"segment failed ({proc.returncode}): {proc.stderr[-2000:]}")
    # The CLI and its Ray session: everything under this bench process but the bench itself ("driver").
    peaks = [sum(r["pss_mb"] for role, r in s.items() if role != "driver") for _, _, s in sampler.samples]
    procs = [sum(r["processes"] for role, r in s.items() if role != "driver") for _, _, s in sampler.samples]
    roles = sorted({role for _, _, s in sampler.samples for role in s})
    per_role = {role: round(max(s.get(role, {}).get("pss_mb", 0.0) for _, _, s in sampler.samples), 1) for role in roles}
    trackers = [line for line in proc.stdout.splitlines() if "tracker steps" in line]
    return {"wall_s": round(wall, 2), "first_record_s": round(first.get("t", start + wall) - start, 2),
            "peak_pss_mb": round(max(peaks), 1), "peak_processes": max(procs), "peak_pss_mb_per_role": per_role,
            "summary": trackers}


def first_record_cli(inputs: list[str], out: Path, extra: list[str]) -> dict:
    """`masklet segment` in a subprocess, timed to its first record by a light poll (50 ms, no memory
    sampling: reading every process's smaps would itself load the 2 cores and quantize to 0.5 s)."""
    start, first = time.perf_counter(), None
    proc = subprocess.Popen(segment_command(inputs, out, extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if first is None and any(f.stat().st_size for f in out.glob("*/masklets.jsonl")):
            first = time.perf_counter() - start
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"segment failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    wall = time.perf_counter() - start
    return {"first_record_s": round(first if first is not None else wall, 2), "wall_s": round(wall, 2)}


def bench_objects(clip: Path, scratch: Path) -> dict:
    rows = {}
    config = scratch / "many-objects.yaml"  # 32 objects: above the default cap of 16 per input
    config.write_text("limits:\n  max_objects_per_stream: 64\n")
    extras = {}
    for n in (1, 8, 32):
        points = [f"{x:.0f},{y:.0f}" for x, y in object_points(n)]
        extras[n] = ["--image-size", "256", "--max-frames", "20", "--config", str(config)] + \
            [a for p in points for a in ("--point", p)]
        rows[n] = segment_cli([str(clip)], scratch / f"objects{n}", extras[n])
        print(f"{n:>2} objects: wall {rows[n]['wall_s']} s, peak PSS {rows[n]['peak_pss_mb']} MB over "
              f"{rows[n]['peak_processes']} processes {rows[n]['peak_pss_mb_per_role']}", flush=True)
    # Start-up without compute: the null model (SAM 2's API, no work), time to the first record. One
    # run's start-up (Ray, four actor processes on 2 cores) swings by +-2 s, so the object counts
    # alternate (drift over time hits each alike) and the median of `repeats` runs is kept.
    null = ["--model-factory", NULL.factory, "--model", "null"]
    repeats = 5
    null_runs: dict[int, list] = {n: [] for n in extras}
    for i in range(repeats):
        for n in extras:
            null_runs[n].append(first_record_cli([str(clip)], scratch / f"null{n}-{i}", extras[n] + null))
    starts = {}
    for n, runs in null_runs.items():
        ordered = sorted(runs, key=lambda r: r["first_record_s"])
        starts[n] = {**ordered[len(ordered) // 2], "first_record_s_runs": [r["first_record_s"] for r in runs]}
        print(f"{n:>2} objects, null model: first record {starts[n]['first_record_s']} s (median; runs "
              f"{starts[n]['first_record_s_runs']})", flush=True)
    per = {f"1->{n}": {"pss_mb_per_object": round((rows[n]["peak_pss_mb"] - rows[1]["peak_pss_mb"]) / (n - 1), 2),
                       "startup_s_per_object": round((starts[n]["first_record_s"] - starts[1]["first_record_s"])
                                                     / (n - 1), 3),
                       "wall_s_per_object_incl_tracking": round((rows[n]["wall_s"] - rows[1]["wall_s"]) / (n - 1), 3)}
           for n in (8, 32)}
    print(f"per extra object: {per} (goal <= 25 MB, <= 0.1 s of start-up)")
    return {"runs_tiny_256": {str(k): v for k, v in rows.items()},
            "runs_null_model": {str(k): v for k, v in starts.items()}, "per_extra_object": per}


# -- archive ---------------------------------------------------------------------------------------------


def cut_clips(paths, folder: Path, count: int = 20, frames: int = 30) -> list[Path]:
    """`count` H.264 clips of `frames` frames each, cut from the shared clips at different offsets."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        src = paths[i % len(paths)]
        offset = (i // len(paths)) * frames
        dst = folder / f"clip{i:02d}.mp4"
        with open_source(str(src), max_frames=offset + frames) as source, av.open(str(dst), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
            for frame in source.frames():
                if frame.frame_idx >= offset:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.rgb),
                                                                           format="rgb24")):
                        container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out.append(dst)
    return out


def bench_archive(paths, scratch: Path) -> dict:
    clip_paths = cut_clips(paths, scratch / "archive")
    points = object_points(2)
    loop = plain_loop(TINY, clip_paths, points, frames=30)
    print(f"archive plain loop: {loop['frames']} frames in {loop['wall_s']} s")
    extra = ["--image-size", "256"] + [a for x, y in points for a in ("--point", f"{x:.0f},{y:.0f}")]
    cli = segment_cli([str(scratch / "archive")], scratch / "archive-out", extra)
    ratio = loop["wall_s"] / cli["wall_s"]
    print(f"masklet segment DIR: {cli['wall_s']} s -> {ratio:.2f}x the loop's speed (goal >= 0.9)")
    return {"clips": len(clip_paths), "frames_per_clip": 30, "objects_per_clip": 2, "loop": loop,
            "segment_cli": cli, "ratio": round(ratio, 3)}


# -- real model -----------------------------------------------------------------------------------------


def bench_real(paths, scratch: Path) -> dict:
    points = object_points(4)
    loop = plain_loop(TINY, paths, points, frames=30)
    pipe = pipeline(TINY, paths, objects_for(4), 30, scratch / "real")
    ratio = loop["wall_s"] / pipe["wall_s"]
    print(f"real model 2x4: loop {loop['wall_s']} s, pipeline {pipe['wall_s']} s -> {ratio:.2f}x (goal >= 1.0)")
    return {"loop": loop, "pipeline": pipe, "ratio": round(ratio, 3)}


# -- publishing ----------------------------------------------------------------------------------------


def bench_publish(paths) -> dict:
    from publish_cost import measure

    result = measure(paths[0])
    print(f"publishing per object per 720p frame (object of 20% of the frame): {result['ours_ms']:.3f} ms (was {result['full_res_ms']:.3f} ms "
          f"with full-resolution logits + pycocotools + np.nonzero; target <= 1.5 ms)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="publish,ceiling,objects,archive,real")
    parser.add_argument("--frames", type=int, default=240, help="frames per clip for the ceiling run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "objects_bench.json")
    args = parser.parse_args()
    paths = clips()[:2]
    scratch = Path(tempfile.mkdtemp(prefix="masklet-objects-"))
    result: dict = {"machine": machine(), "note": "2 cores shared with whatever else ran; ratios are side by side"}
    if args.out.exists():  # keep the sections this run does not redo
        result = {**json.loads(args.out.read_text()), **result}
    steps = {"publish": lambda: bench_publish(paths), "ceiling": lambda: bench_ceiling(paths, scratch, args.frames),
             "objects": lambda: bench_objects(paths[0], scratch), "archive": lambda: bench_archive(clips(), scratch),
             "real": lambda: bench_real(paths, scratch)}
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        result[name] = steps[name]()
        result["goals"] = goals(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["goals"], indent=1))
    print(f"wrote {args.out}")


def goals(result: dict) -> dict:
    """The issue's goals against what the sections hold (sections from an earlier run included)."""
    out: dict = {}

    def goal(name: str, text: str, measured, met: bool) -> None:
        out[name] = {"goal": text, "measured": measured, "met": bool(met)}

    if "publish" in result:
        goal("publish_ms_per_object_720p", "<= 1.5", result["publish"]["ours_ms"], result["publish"]["ours_ms"] <= 1.5)
    if "ceiling" in result:
        ceiling = result["ceiling"]
        startup = ceiling.get("startup_s_median", ceiling["pipeline"]["startup_s"])
        goal("ceiling_ratio", ">= 1.5", ceiling["ratio"], ceiling["ratio"] >= 1.5)
        goal("startup_s", "<= 5", startup, startup <= 5)
    if "objects" in result:
        per = result["objects"]["per_extra_object"]
        pss = {k: v["pss_mb_per_object"] for k, v in per.items()}
        start = {k: v["startup_s_per_object"] for k, v in per.items()}
        goal("pss_mb_per_extra_object", "<= 25", pss, all(v <= 25 for v in pss.values()))
        goal("startup_s_per_extra_object", "<= 0.1", start, all(v <= 0.1 for v in start.values()))
    if "archive" in result:
        goal("archive_ratio", ">= 0.9", result["archive"]["ratio"], result["archive"]["ratio"] >= 0.9)
    if "real" in result:
        goal("real_model_ratio", ">= 1.0", result["real"]["ratio"], result["real"]["ratio"] >= 1.0)
    return out


if __name__ == "__main__":
    main()
