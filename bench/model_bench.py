"""Tracker speed vs the official SAM2VideoPredictor, same CPU, same weights, same preprocessed frames.

    .venv/bin/python bench/model_bench.py [--frames 30] [--image-size 512] [--model sam2.1_hiera_tiny]
        [--precision fp32|bf16] [--step-many-objects 8]

Both sides run image encoding + tracking per frame (prompt on frame 0, then propagation). Frame
decoding/resizing is excluded on both sides: ours is fed the official predictor's own normalised
frames. Prints frames/s for both and the ratio. The official predictor always runs fp32 (its CPU
default); --precision sets ours. Then, unless --step-many-objects 0, the same N objects of one stream
are tracked one `tracker.step` at a time and with one `model.step_many` per frame (embeddings
precomputed, tracking only), alternating, and their results compared bit for bit.
Writes bench/results/model_bench.json (fp32) or model_bench_<precision>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Wall time by default. --threads 1 switches to this process's CPU time: on a shared, loaded machine
# it does not count the time other processes hold the cores (measured side by side all the same).
CLOCK = time.perf_counter
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "model")]

from masklet.model import Prompt, StepRequest  # noqa: E402
from oracle import build_official_video_predictor, official_state, ours_from, read_clip  # noqa: E402

CLICKS = [[160.0, 90.0], [60.0, 140.0], [260.0, 60.0]]


GRID_CLICKS = [[x, y] for y in (60.0, 120.0) for x in (40.0, 120.0, 200.0, 280.0)]  # 8 objects, 320x180 coords


def time_step_many(model, images, video_size, num_objects: int, repeats: int) -> dict:
    """Tracking only: N objects stepped one by one vs one step_many per frame, alternating."""
    embeddings = model.encode(images)
    scale = (video_size[1] / 320.0, video_size[0] / 180.0)
    prompts = [Prompt(points=[[x * scale[0], y * scale[1]]], labels=[1]) for x, y in GRID_CLICKS[:num_objects]]

    def run(batched: bool):
        trackers = [model.new_tracker(video_size) for _ in prompts]
        for t, p in zip(trackers, prompts):
            t.step(0, embeddings[0], p)
        outs, start = [], CLOCK()
        for i in range(1, len(embeddings)):
            requests = [StepRequest(t, i, embeddings[i]) for t in trackers]
            outs.append(model.step_many(requests) if batched else [t.step(i, embeddings[i]) for t in trackers])
        return CLOCK() - start, outs

    run(False), run(True)  # warm-up
    times = {"one_by_one": [], "step_many": []}
    for _ in range(repeats):
        t1, one = run(False)
        tn, many = run(True)
        times["one_by_one"].append(t1)
        times["step_many"].append(tn)
    worst = max((a.low_res_logits - b.low_res_logits).abs().max().item()
                for fa, fb in zip(one, many) for a, b in zip(fa, fb))
    steps = (len(embeddings) - 1) * num_objects
    best = {k: min(v) for k, v in times.items()}
    return {
        "objects": num_objects, "frames": len(embeddings) - 1,
        "ms_per_object_step": {k: 1000 * v / steps for k, v in best.items()},
        "ratio": best["one_by_one"] / best["step_many"],
        "max_abs_logit_diff": worst, "seconds_per_run": times,
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "device": "cpu",
        "load_average_at_start": os.getloadavg(),
    }


def time_official(predictor, frames, workdir: Path, num_objects: int) -> float:
    state, _ = official_state(predictor, frames, workdir)
    start = CLOCK()
    for obj in range(num_objects):
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj + 1, points=[CLICKS[obj]], labels=[1])
    for _ in predictor.propagate_in_video(state):
        pass
    return CLOCK() - start


def time_ours(model, images, video_size, num_objects: int) -> float:
    start = CLOCK()
    trackers = [model.new_tracker(video_size) for _ in range(num_objects)]
    for i in range(images.shape[0]):
        embedding = model.encode(images[i : i + 1])[0]
        for obj, tracker in enumerate(trackers):
            tracker.step(i, embedding, Prompt(points=[CLICKS[obj]], labels=[1]) if i == 0 else None)
    return CLOCK() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--model", default="sam2.1_hiera_tiny")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    parser.add_argument("--video", default=str(ROOT.parent / "shared" / "videos" / "01_dog.mp4"))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="ours (official: fp32)")
    parser.add_argument("--objects", default="1,3", help="object counts compared with the official predictor")
    parser.add_argument("--step-many-objects", type=int, default=8, help="0 skips the step_many comparison")
    parser.add_argument("--step-many-frames", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; 1 also times by process CPU time instead of wall time")
    args = parser.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.threads == 1:
            CLOCK = time.process_time
    clock = "process CPU time, 1 thread" if CLOCK is time.process_time else "wall time"
    suffix = ("" if args.precision == "fp32" else f"_{args.precision}") + ("_1thread" if args.threads == 1 else "")
    out = args.out or str(ROOT / "bench" / "results" / f"model_bench{suffix}.json")

    official = build_official_video_predictor(args.model, args.image_size)
    ours = ours_from(official, args.model, args.image_size, precision=args.precision)
    frames = read_clip(Path(args.video), args.frames, size=(640, 360))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state, images = official_state(official, frames, Path(tmp))
        video_size = (state["video_height"], state["video_width"])
        for num_objects in [int(n) for n in args.objects.split(",") if n]:
            # Warm-up on 2 frames so one-time allocations do not count against either side; then
            # alternate the sides so drift in machine load does not favour one of them.
            time_ours(ours, images[:2], video_size, num_objects)
            official_times, our_times = [], []
            for r in range(args.repeats):
                official_times.append(time_official(official, frames, Path(tmp) / f"o{num_objects}-{r}", num_objects))
                our_times.append(time_ours(ours, images, video_size, num_objects))
            t_official, t_ours = min(official_times), min(our_times)
            row = {
                "objects": num_objects,
                "official_fps": args.frames / t_official,
                "masklet_fps": args.frames / t_ours,
                "ratio": t_official / t_ours,
                "official_seconds_per_run": official_times,
                "masklet_seconds_per_run": our_times,
            }
            rows.append(row)
            print(f"{num_objects} object(s): official {row['official_fps']:.2f} frames/s, "
                  f"masklet {row['masklet_fps']:.2f} frames/s, ratio {row['ratio']:.2f}x")
        step_many = None
        if args.step_many_objects:
            step_many = time_step_many(ours, images[: args.step_many_frames + 1], video_size, args.step_many_objects,
                                       args.repeats)
            print(f"{step_many['objects']} objects, tracking only: one by one "
                  f"{step_many['ms_per_object_step']['one_by_one']:.0f} ms/object-step, step_many "
                  f"{step_many['ms_per_object_step']['step_many']:.0f} ms/object-step, ratio {step_many['ratio']:.2f}x, "
                  f"max |d logit| {step_many['max_abs_logit_diff']}")
    info = machine()
    info["load_average_at_end"] = os.getloadavg()
    result = {
        "benchmark": "model_bench", "model": args.model, "image_size": args.image_size, "frames": args.frames,
        "precision": {"masklet": args.precision, "official": "fp32"},
        "video": Path(args.video).name, "frame_size": [640, 360], "machine": info, "clock": clock, "results": rows,
        "step_many": step_many, "repeats": args.repeats,
        "notes": "same random weights and preprocessed frames on both sides; both encode every frame once "
                 "and track each object; timings include image encoding; best of alternating repeats",
        "limits": "fp32: the fused attention kernel and the matrix products are ~85% of a tracker step and most "
                  "of an encoder pass; they are the very calls (same shapes, same kernels) the official predictor "
                  "makes, and bit-exact parity rules out changing them (e.g. caching k/v projections of stored "
                  "memories changes rounding). Exact savings come from around them: the encoder's position "
                  "embedding cached, the key-rotation table cached, no full-resolution upsampling per step. "
                  "bf16 (--precision bf16) is the fast path. step_many: this 2-core CPU is compute-bound at "
                  "batch 1 already, so batching objects saves little here; it is meant for GPUs.",
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
