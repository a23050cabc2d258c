"""Tracker speed vs the official SAM2VideoPredictor, same CPU, same weights, same preprocessed frames.

    .venv/bin/python bench/model_bench.py [--frames 30] [--image-size 512] [--model sam2.1_hiera_tiny]

Both sides run image encoding + tracking per frame (prompt on frame 0, then propagation). Frame
decoding/resizing is excluded on both sides: ours is fed the official predictor's own normalised
frames. Prints frames/s for both and the ratio; writes bench/results/model_bench.json.
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "model")]

from masklet.model import Prompt  # noqa: E402
from oracle import build_official_video_predictor, official_state, ours_from, read_clip  # noqa: E402

CLICKS = [[160.0, 90.0], [60.0, 140.0], [260.0, 60.0]]


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "device": "cpu",
    }


def time_official(predictor, frames, workdir: Path, num_objects: int) -> float:
    state, _ = official_state(predictor, frames, workdir)
    start = time.perf_counter()
    for obj in range(num_objects):
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj + 1, points=[CLICKS[obj]], labels=[1])
    for _ in predictor.propagate_in_video(state):
        pass
    return time.perf_counter() - start


def time_ours(model, images, video_size, num_objects: int) -> float:
    start = time.perf_counter()
    trackers = [model.new_tracker(video_size) for _ in range(num_objects)]
    for i in range(images.shape[0]):
        embedding = model.encode(images[i : i + 1])[0]
        for obj, tracker in enumerate(trackers):
            tracker.step(i, embedding, Prompt(points=[CLICKS[obj]], labels=[1]) if i == 0 else None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--model", default="sam2.1_hiera_tiny")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    parser.add_argument("--video", default=str(ROOT.parent / "shared" / "videos" / "01_dog.mp4"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "model_bench.json"))
    args = parser.parse_args()

    official = build_official_video_predictor(args.model, args.image_size)
    ours = ours_from(official, args.model, args.image_size)
    frames = read_clip(Path(args.video), args.frames, size=(640, 360))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state, images = official_state(official, frames, Path(tmp))
        video_size = (state["video_height"], state["video_width"])
        for num_objects in (1, 3):
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
    result = {
        "benchmark": "model_bench", "model": args.model, "image_size": args.image_size, "frames": args.frames,
        "video": Path(args.video).name, "frame_size": [640, 360], "machine": machine(), "results": rows,
        "repeats": args.repeats,
        "notes": "same random weights and preprocessed frames on both sides; both encode every frame once "
                 "and track each object; timings include image encoding; best of alternating repeats",
        "limits": "per object-step, memory attention (SDPA + linear layers) is ~88% of the time at 512 px and "
                  "runs the same kernels on both sides; bit-exact parity rules out caching the k/v projections "
                  "of stored memories, which would change float rounding",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
