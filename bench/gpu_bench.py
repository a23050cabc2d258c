"""Throughput on a GPU: N streams x M objects through the pipeline vs the official predictor run
one video at a time, for each model, in bf16 (as the official predictor runs on GPUs).

    .venv/bin/python bench/gpu_bench.py                      # the issue's settings (needs a GPU)
    .venv/bin/python bench/gpu_bench.py --device cpu --inputs 2 --objects 2 --frames 4 --image-size 256 \
        --models sam2.1_hiera_tiny --precision fp32         # smoke run on the CPU

Issue settings: sam2.1_hiera_tiny and sam2.1_hiera_large at 1024 px, bf16, 8 streams x 4 objects,
60 frames each (the shared clips, cycled). Both sides use the same random weights (seed 0): the
official SAM2VideoPredictor (PyPI sam2, the test oracle) is built first and its state dict is the
pipeline's checkpoint. Objects: 4 positive clicks on a grid, all on frame 0.

- official: per input, in turn: init_state on that input's frames as JPEGs (written untimed),
  the 4 clicks, propagate_in_video to the end under bf16 autocast, masks copied to the host.
- pipeline: one Engine run over all inputs at once (Ray; on CUDA the encoder and the trackers share
  one process, embeddings stay on the device), masklets.jsonl sink, timed after the model loaded.
Reports frames/s, object-frames/s and achieved TFLOP/s (FLOPs of one encoder pass and one tracker
step counted once with torch's FlopCounterMode, times the frames and object-steps done) for both
sides and their ratio. Writes <out>/gpu_bench.json for the issue's settings on CUDA; other runs get
their own name (gpu_bench_cpu_smoke.json on the CPU), so a smoke run never overwrites a GPU result.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "model"), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from masklet.actors.payloads import ModelSpec  # noqa: E402
from masklet.model.config import get_config  # noqa: E402
from masklet.model.types import Prompt  # noqa: E402
from oracle import build_official_video_predictor  # noqa: E402
from masklet.actors.backend import RayBackend  # noqa: E402
from masklet.pipeline.config import load_settings  # noqa: E402
from masklet.pipeline.configure import engine_config  # noqa: E402
from masklet.pipeline.engine import Engine, EngineConfig, StreamSpec  # noqa: E402
from masklet.actors.sinks import JsonlOutputs  # noqa: E402
from masklet.actors.sources import open_source  # noqa: E402
from bench_common import machine as base_machine  # noqa: E402

GPU_SETTINGS = {"inputs": 8, "objects": 4, "frames": 60, "image_size": 1024,
                "models": "sam2.1_hiera_tiny,sam2.1_hiera_large", "precision": "bf16"}
SMOKE_HINT = ("--device cpu --inputs 2 --objects 2 --frames 4 --image-size 256 --models sam2.1_hiera_tiny "
              "--precision fp32")



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


def grid(n: int, width: int, height: int) -> list[tuple[float, float]]:
    cols = int(np.ceil(np.sqrt(n)))
    return [((i % cols + 0.5) * width / cols, (i // cols + 0.5) * height / cols) for i in range(n)]


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_official(predictor, jpeg_dir: Path, points, device: str, precision: str) -> tuple[int, float]:
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        state = predictor.init_state(str(jpeg_dir))
        for obj_id, point in enumerate(points, 1):
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, points=[list(point)], labels=[1])
        count = 0
        for _, _, logits in predictor.propagate_in_video(state):
            (logits > 0).cpu().numpy()  # what a user does with each frame's masks; also syncs CUDA
            count += 1
    elapsed = time.perf_counter() - start
    predictor.reset_state(state)
    return count, elapsed


def flops_per_frame_and_step(spec: ModelSpec, device: str) -> tuple[float, float]:
    """FLOPs of one encoder pass on one frame and of one tracking step, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = spec.build()
    frame = np.zeros((720, 1280, 3), np.uint8)
    with torch.inference_mode(), autocast(device, spec.precision):
        with FlopCounterMode(display=False) as encode_counter:
            emb = model.encode(frame[None])[0]
        tracker = model.new_tracker((720, 1280))
        tracker.step(0, emb, Prompt(points=[[640, 360]], labels=[1]))
        for j in range(1, 8):  # past the memory window, so the counted step attends to a full bank
            tracker.step(j, emb)
        with FlopCounterMode(display=False) as step_counter:
            tracker.step(8, emb)
    return float(encode_counter.get_total_flops()), float(step_counter.get_total_flops())


def run_pipeline(spec: ModelSpec, config: EngineConfig, inputs, points, out: Path) -> dict:
    backend = RayBackend(init_kwargs={"num_cpus": os.cpu_count()})
    try:
        engine = Engine(backend, spec, config)
        engine.start_encoder()
        backend.get(backend.call(engine.executor.encoder, "pid"))  # model loaded before the clock starts
        objects = {i + 1: {0: Prompt(points=[list(p)], labels=[1])} for i, p in enumerate(points)}
        specs = [StreamSpec(sid, functools.partial(open_source, str(clip), max_frames=n), objects,
                            JsonlOutputs(str(out)), bidirectional=False)
                 for sid, clip, n, _ in inputs]
        start = time.perf_counter()
        report = engine.run(specs)
        wall = time.perf_counter() - start
        engine.shutdown()
    finally:
        backend.shutdown()
    frames = sum(o.frames_published for o in report.streams.values())
    return {"frames": frames, "wall_s": wall, "fps": frames / wall,
            "failed": {sid: o.error for sid, o in report.streams.items() if not o.ok},
            "batch_sizes": {str(k): v for k, v in sorted(report.batch_sizes.items())},
            "tracker_batch_sizes": {str(k): v for k, v in sorted(report.tracker_batch_sizes.items())}}


def bench(args: argparse.Namespace, model: str, device: str, clips: list[Path], scratch: Path) -> dict:
    # Untimed set-up: the shared weights, and each distinct clip's frames as JPEGs for the official side.
    official = build_official_video_predictor(model, args.image_size, seed=0, device=device)
    checkpoint = scratch / f"{model}.pt"
    torch.save({"model": {k: v.detach().cpu() for k, v in official.state_dict().items()}}, checkpoint)
    jpegs = {}
    for clip in clips[:args.inputs]:
        folder = scratch / "jpg" / clip.stem
        jpegs[clip] = (folder, *(write_jpegs(clip, args.frames, folder) if not folder.exists() else
                                 (len(list(folder.glob("*.jpg"))), 1280, 720)))
    inputs = []  # (stream id, clip, frames, jpeg folder)
    for i in range(args.inputs):
        clip = clips[i % len(clips)]
        folder, count, width, height = jpegs[clip]
        inputs.append((f"{i:02d}_{clip.stem}", clip, count, folder))
    points = grid(args.objects, width, height)

    warm = scratch / "jpg" / f"warmup-{model}"
    warm.mkdir()
    for path in sorted(inputs[0][3].glob("*.jpg"))[:2]:
        (warm / path.name).symlink_to(path)
    run_official(official, warm, points, device, args.precision)  # CUDA/allocator set-up out of the clock
    runs = [run_official(official, folder, points, device, args.precision) for *_, folder in inputs]
    official_frames, official_s = sum(n for n, _ in runs), sum(t for _, t in runs)
    del official, runs
    if device == "cuda":
        torch.cuda.empty_cache()  # the pipeline's actors share this GPU

    spec = ModelSpec(model, str(checkpoint), args.image_size, device, seed=0, precision=args.precision)
    encode_flops, step_flops = flops_per_frame_and_step(spec, device)
    settings = load_settings(model={"name": model, "checkpoint": str(checkpoint), "image_size": args.image_size,
                                    "device": device, "precision": args.precision})
    config = engine_config(settings, spec, max_batch_size=8 if device == "cuda" else 4)
    pipe = run_pipeline(spec, config, inputs, points, scratch / f"out-{model}")

    def rates(frames: int, seconds: float) -> dict:
        object_frames = frames * args.objects
        return {"frames": frames, "wall_s": round(seconds, 2), "fps": round(frames / seconds, 2),
                "object_frames_per_s": round(object_frames / seconds, 2),
                "tflops": round((frames * encode_flops + object_frames * step_flops) / seconds / 1e12, 3)}

    official_result = rates(official_frames, official_s)
    pipe.update(rates(pipe["frames"], pipe["wall_s"]))
    ratio = pipe["fps"] / official_result["fps"]
    print(f"{model} {args.precision}: official (one video at a time) {official_result['fps']} frames/s, "
          f"{official_result['object_frames_per_s']} object-frames/s, {official_result['tflops']} TFLOP/s; "
          f"pipeline {pipe['fps']} frames/s, {pipe['object_frames_per_s']} object-frames/s, {pipe['tflops']} "
          f"TFLOP/s -> {ratio:.2f}x; encoder batches {pipe['batch_sizes']}, tracker batches "
          f"{pipe['tracker_batch_sizes']}")
    if pipe["failed"]:
        print(f"FAILED streams: {pipe['failed']}")
    return {"inputs": [sid for sid, *_ in inputs], "objects_per_input": args.objects,
            "flops": {"encoder_per_frame": encode_flops, "tracker_per_object_step": step_flops},
            "executor_config": {k: getattr(config.executor, k) for k in ("max_batch_size", "max_wait_ms", "colocate",
                                                                         "encoder_gpus", "tracker_gpus")},
            "official": official_result, "pipeline": pipe, "ratio_pipeline_over_official": round(ratio, 3)}


def parse_args() -> tuple[argparse.Namespace, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, help=f"concurrent inputs (default {GPU_SETTINGS['inputs']})")
    parser.add_argument("--objects", type=int, help=f"objects per input (default {GPU_SETTINGS['objects']})")
    parser.add_argument("--models", help=f"comma-separated (default {GPU_SETTINGS['models']})")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default bf16")
    parser.add_argument("--frames", type=int, help=f"frames per input (default {GPU_SETTINGS['frames']})")
    parser.add_argument("--image-size", type=int, help=f"model input size (default {GPU_SETTINGS['image_size']})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    keys = ("inputs", "objects", "frames", "image_size", "models", "precision")
    left_defaults = all(getattr(args, key) is None for key in keys)
    for key in keys:
        if getattr(args, key) is None:
            setattr(args, key, GPU_SETTINGS[key])
    if min(args.inputs, args.frames, args.objects) < 1 or args.image_size % 16:
        parser.error("--inputs, --objects and --frames must be >= 1 and --image-size a multiple of 16")
    return args, left_defaults


def main() -> None:
    args, left_defaults = parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but torch sees no CUDA GPU")
    if device == "cpu" and left_defaults:
        print(f"this benchmark is meant for a GPU (8 inputs x 4 objects x 60 frames at 1024 px would take hours on "
              f"a CPU); for a smoke run on the CPU try: {SMOKE_HINT}")
        sys.exit(2)
    settings = {key: getattr(args, key) for key in GPU_SETTINGS}
    if device == "cuda":
        name = "gpu_bench" if settings == GPU_SETTINGS else \
            f"gpu_bench_cuda_{args.inputs}x{args.objects}x{args.frames}_{args.image_size}px_{args.precision}"
    else:
        name = "gpu_bench_cpu_smoke"
    clips = find_clips()
    info = machine(device)
    print(f"machine: {info}")
    with tempfile.TemporaryDirectory(prefix="masklet-gpu-bench-") as tmp:
        per_model = {model: bench(args, model, device, clips, Path(tmp)) for model in args.models.split(",")}
    result = {"benchmark": "gpu_bench", "machine": info, "settings": {**settings, "device": device},
              "smoke": device == "cpu", "models": per_model}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if any(r["pipeline"]["failed"] or r["pipeline"]["frames"] != r["official"]["frames"] for r in per_model.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
