"""Aggregate throughput on a GPU: N concurrent inputs through the pipeline vs N sequential official runs.

    .venv/bin/python bench/gpu_bench.py [--inputs 8] [--frames 60] [--image-size 1024] [--device auto]
    .venv/bin/python bench/gpu_bench.py --device cpu --inputs 2 --frames 4 --image-size 256   # smoke run

The issue's comparison: "On a GPU, run 8 concurrent inputs at 1024 px through the pipeline and report
aggregate frames/s against 8 sequential official-predictor runs." Inputs are the shared clips
(../shared/videos, or $MASKLET_TEST_VIDEOS), cycled to N and cut to --frames frames each; one object per
input, a positive click at the frame centre on frame 0. Both sides use the same random weights (seed 0):
the official SAM2VideoPredictor (PyPI sam2) is built first and its state dict is the pipeline's checkpoint.

- official: per input, in turn, init_state on a folder of that input's frames as JPEGs (written
  untimed; init_state is timed, it is the predictor's own decode + resize), the click, propagate_in_video
  to the end, masks copied to the host as its video notebook does. One untimed 2-frame warm-up first.
- pipeline: one Engine run over all N inputs at once through Ray (masklets.jsonl sink only), timed from
  after the encoder has loaded its model; video decoding and tracker start-up are inside the clock.
Aggregate frames/s = all frames / all seconds on each side. Prints the machine, both rates, their ratio
and the encoder batch sizes run. Writes <out>/gpu_bench.json for the issue's settings on CUDA; any other
run gets its own name (gpu_bench_cpu_smoke.json on the CPU), so a smoke run never overwrites a GPU result.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "model"), str(ROOT / "bench")]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from masklet.actors.payloads import ModelSpec  # noqa: E402
from masklet.model.config import get_config  # noqa: E402
from masklet.model.types import Prompt  # noqa: E402
from oracle import build_official_video_predictor  # noqa: E402
from masklet.actors.backend import RayBackend  # noqa: E402
from masklet.pipeline.engine import Engine, EngineConfig, StreamSpec  # noqa: E402
from masklet.actors.sinks import JsonlOutputs  # noqa: E402
from masklet.actors.sources import open_source  # noqa: E402
from pipeline_bench import machine as base_machine  # noqa: E402

GPU_SETTINGS = {"inputs": 8, "frames": 60, "image_size": 1024, "model": "sam2.1_hiera_tiny"}
SMOKE_HINT = "--device cpu --inputs 2 --frames 4 --image-size 256"



def machine(device: str) -> dict:
    info = base_machine()
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["device"] = device
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    from importlib.metadata import version

    info["sam2"] = version("sam2")
    return info


def find_clips() -> list[Path]:
    folder = Path(os.environ.get("MASKLET_TEST_VIDEOS", ROOT.parent / "shared" / "videos"))
    folder = folder if folder.is_absolute() else ROOT / folder
    clips = sorted(folder.glob("*.mp4"))
    if not clips:
        sys.exit(f"no .mp4 clips in {folder}; set MASKLET_TEST_VIDEOS to the folder holding the shared clips")
    return clips


def write_jpegs(clip: Path, frames: int, folder: Path) -> tuple[int, int, int]:
    """The first `frames` frames, decoded as the pipeline decodes them; returns (count, width, height)."""
    folder.mkdir(parents=True)
    source = open_source(str(clip), max_frames=frames)
    count = 0
    try:
        for frame in source.frames():
            Image.fromarray(frame.rgb).save(folder / f"{frame.frame_idx:05d}.jpg", quality=95)
            count += 1
    finally:
        source.close()
    if not count:
        sys.exit(f"{clip} has no decodable frames")
    height, width = frame.rgb.shape[:2]
    return count, width, height


def run_official(predictor, jpeg_dir: Path, centre: tuple[float, float]) -> tuple[int, float]:
    start = time.perf_counter()
    state = predictor.init_state(str(jpeg_dir))
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[list(centre)], labels=[1])
    count = 0
    for _, _, logits in predictor.propagate_in_video(state):
        (logits[0] > 0).cpu().numpy()  # what a user does with each mask; also syncs CUDA
        count += 1
    elapsed = time.perf_counter() - start
    predictor.reset_state(state)
    return count, elapsed


def run_pipeline(spec: ModelSpec, config: EngineConfig, inputs, out: Path) -> dict:
    backend = RayBackend(init_kwargs={"num_cpus": os.cpu_count()})
    try:
        engine = Engine(backend, spec, config)
        engine.start_encoder()
        backend.get(backend.call(engine.encoder, "pid"))  # model loaded before the clock starts
        specs = [StreamSpec(sid, functools.partial(open_source, str(clip), max_frames=n),
                            {1: {0: Prompt(points=[list(centre)], labels=[1])}}, JsonlOutputs(str(out)))
                 for sid, clip, n, centre, _ in inputs]
        start = time.perf_counter()
        report = engine.run(specs)
        wall = time.perf_counter() - start
        engine.shutdown()
    finally:
        backend.shutdown()
    frames = sum(o.frames_published for o in report.streams.values())
    return {"frames": frames, "wall_s": wall, "fps": frames / wall,
            "failed": {sid: o.error for sid, o in report.streams.items() if not o.ok},
            "batch_sizes": {str(k): v for k, v in sorted(report.batch_sizes.items())}}


def bench(args: argparse.Namespace, device: str, clips: list[Path], scratch: Path) -> dict:
    # Untimed set-up: the shared weights, and each distinct clip's frames as JPEGs for the official side.
    official = build_official_video_predictor(args.model, args.image_size, seed=0, device=device)
    checkpoint = scratch / "weights.pt"
    torch.save({"model": {k: v.detach().cpu() for k, v in official.state_dict().items()}}, checkpoint)
    jpegs = {}
    for clip in clips[:args.inputs]:
        jpegs[clip] = (scratch / "jpg" / clip.stem, *write_jpegs(clip, args.frames, scratch / "jpg" / clip.stem))
    inputs = []  # (stream id, clip, frames, centre click, jpeg folder)
    for i in range(args.inputs):
        clip = clips[i % len(clips)]
        folder, count, width, height = jpegs[clip]
        inputs.append((f"{i:02d}_{clip.stem}", clip, count, (width / 2, height / 2), folder))

    warm = scratch / "jpg" / "warmup"
    warm.mkdir()
    for path in sorted(inputs[0][4].glob("*.jpg"))[:2]:
        (warm / path.name).symlink_to(path)
    run_official(official, warm, inputs[0][3])  # one-time CUDA/allocator set-up kept out of the clock
    runs = [run_official(official, folder, centre) for _, _, _, centre, folder in inputs]
    official_frames, official_s = sum(n for n, _ in runs), sum(t for _, t in runs)
    official_result = {"frames": official_frames, "wall_s": official_s, "fps": official_frames / official_s,
                       "seconds_per_input": [t for _, t in runs]}
    print(f"official, {args.inputs} sequential runs: {official_frames} frames in {official_s:.1f}s "
          f"= {official_result['fps']:.2f} frames/s")
    del official, runs
    if device == "cuda":
        torch.cuda.empty_cache()  # the pipeline's actors share this GPU

    gpu = device == "cuda"
    spec = ModelSpec(args.model, str(checkpoint), args.image_size, device, seed=0)
    delay = get_config(args.model, image_size=args.image_size).max_obj_ptrs_in_encoder - 1
    config = EngineConfig(max_batch_size=8 if gpu else 4, max_wait_ms=10, backward_delay=delay,
                          encoder_gpus=0.5 if gpu else 0.0, tracker_gpus=0.01 if gpu else 0.0)
    pipe = run_pipeline(spec, config, inputs, scratch / "out")
    ratio = pipe["fps"] / official_result["fps"]
    print(f"pipeline, {args.inputs} concurrent inputs: {pipe['frames']} frames in {pipe['wall_s']:.1f}s "
          f"= {pipe['fps']:.2f} frames/s")
    print(f"ratio (pipeline / official): {ratio:.2f}x")
    print(f"encoder batch sizes (size: count): {pipe['batch_sizes']}")
    if pipe["failed"]:
        print(f"FAILED streams: {pipe['failed']}")

    return {"inputs": [sid for sid, *_ in inputs],
            "engine_config": {"max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms,
                              "encoder_gpus": config.encoder_gpus, "tracker_gpus": config.tracker_gpus},
            "official": official_result, "pipeline": pipe, "ratio_pipeline_over_official": ratio,
            "notes": "same random weights (seed 0) on both sides, float32; one object per input, centre click "
                     "on frame 0; official: init_state (JPEG decode + resize) + click + propagation per input, "
                     "run one after another; pipeline: all inputs concurrently, mp4 decode included"}


def parse_args() -> tuple[argparse.Namespace, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, help=f"concurrent inputs (default {GPU_SETTINGS['inputs']})")
    parser.add_argument("--frames", type=int, help=f"frames per input (default {GPU_SETTINGS['frames']})")
    parser.add_argument("--image-size", type=int, help=f"model input size (default {GPU_SETTINGS['image_size']})")
    parser.add_argument("--model", default=GPU_SETTINGS["model"])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    left_defaults = args.inputs is None and args.frames is None and args.image_size is None
    for key in ("inputs", "frames", "image_size"):
        if getattr(args, key) is None:
            setattr(args, key, GPU_SETTINGS[key])
    if min(args.inputs, args.frames) < 1 or args.image_size % 16:
        parser.error("--inputs and --frames must be >= 1 and --image-size a multiple of 16")
    return args, left_defaults


def main() -> None:
    args, left_defaults = parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but torch sees no CUDA GPU")
    if device == "cpu" and left_defaults:
        print(f"this benchmark is meant for a GPU (8 inputs x 60 frames at 1024 px would take about an hour on a "
              f"CPU); for a smoke run on the CPU try: {SMOKE_HINT}")
        sys.exit(2)
    settings = {"inputs": args.inputs, "frames": args.frames, "image_size": args.image_size, "model": args.model}
    if device == "cuda":
        name = "gpu_bench" if settings == GPU_SETTINGS else \
            f"gpu_bench_cuda_{args.inputs}x{args.frames}_{args.image_size}px_{args.model}"
    else:
        name = "gpu_bench_cpu_smoke"
    clips = find_clips()
    info = machine(device)
    print(f"machine: {info}")
    with tempfile.TemporaryDirectory(prefix="masklet-gpu-bench-") as tmp:
        result = bench(args, device, clips, Path(tmp))
    result = {"benchmark": "gpu_bench", "machine": info, "settings": {**settings, "device": device},
              "smoke": device == "cpu", **result}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if result["pipeline"]["failed"] or result["pipeline"]["frames"] != result["official"]["frames"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
