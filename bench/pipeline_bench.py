"""Pipeline throughput vs a plain in-process loop over the same model calls, and memory flatness.

    .venv/bin/python bench/pipeline_bench.py [--frames 60] [--rss-frames 2000] [--image-size 256]

1. Two inputs (the shared clips when present, else synthetic), one object each, through the Ray
   engine (masklets.jsonl sink) vs a loop doing decode -> encode -> track -> RLE record per frame.
   Prints the efficiency ratio (pipeline frames/s / loop frames/s; goal >= 0.9 on CPU) and the
   encoder batch sizes actually run.
2. One long synthetic stream: memory of the driver plus the whole local Ray session, sampled while it
   runs, as PSS (shared pages split among the processes mapping them; summed RSS would count torch's
   libraries and object-store pages once per worker). Flat: the last quarter's peak is within 5% of the
   second quarter's (the first quarter is warm-up). Per-role peaks show where any growth lives.
Writes bench/results/pipeline_bench.json, with the machine described.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from masklet.actors.payloads import ModelSpec  # noqa: E402
from masklet.model.config import get_config  # noqa: E402
from masklet.model.types import Prompt  # noqa: E402
from masklet.actors.backend import RayBackend  # noqa: E402
from masklet.pipeline.engine import Engine, EngineConfig, StreamSpec  # noqa: E402
from masklet.pipeline.executor_config import ExecutorConfig  # noqa: E402
from masklet.actors.sinks import JsonlOutputs  # noqa: E402
from masklet.actors.sources import open_source  # noqa: E402
from bench_common import machine, plain_loop as common_loop  # noqa: E402
from memory_probe import MemorySampler  # noqa: E402



class SyntheticSource:
    """A coloured square moving over a gradient; endless-stream stand-in for the RSS run."""

    def __init__(self, num_frames: int, width: int = 320, height: int = 240) -> None:
        self.name, self.width, self.height, self.fps = "synthetic", width, height, 30.0
        self.frame_count, self.is_live, self.num_frames = num_frames, False, num_frames

    def frames(self):
        from masklet.actors.sources import DecodedFrame

        ys, xs = np.mgrid[0:self.height, 0:self.width]
        base = np.stack([xs % 256, ys % 256, (xs + ys) % 256], -1).astype(np.uint8)
        for i in range(self.num_frames):
            rgb = base.copy()
            x = (i * 3) % (self.width - 40)
            rgb[100:140, x:x + 40] = (250, 10, 10)
            yield DecodedFrame(i, i / self.fps, rgb, (self.width, self.height))

    def close(self):
        pass


def inputs(frames: int):
    clips = sorted((ROOT.parent / "shared" / "videos").glob("*.mp4"))[:2]
    if len(clips) == 2:
        return [(c.stem, functools.partial(open_source, str(c), max_frames=frames), (640.0, 360.0)) for c in clips]
    return [(f"synthetic{i}", functools.partial(SyntheticSource, frames), (160.0, 120.0)) for i in range(2)]


def plain_loop(spec: ModelSpec, streams) -> tuple[float, int]:
    """What one process would do without the pipeline: same model calls, frame by frame."""
    wall, count = 0.0, 0
    for _, opener, point in streams:
        result = common_loop(spec, [None], [point], frames=10**9, open_fn=lambda _, opener=opener: opener())
        wall, count = wall + result["wall_s"], count + result["frames"]
    return wall, count


def pipeline_run(spec: ModelSpec, streams, config: EngineConfig, out: Path, backend) -> dict:
    first = {}

    def progress(outcome):
        first.setdefault("t", time.perf_counter())
        first["n0"] = first.get("n0", outcome.frames_published)

    engine = Engine(backend, spec, config, on_progress=progress)
    engine.start_encoder()
    backend.get(backend.call(engine.executor.encoder, "pid"))  # model loaded before the clock starts
    specs = [StreamSpec(sid, opener, {1: {0: Prompt(points=[[x, y]], labels=[1])}}, JsonlOutputs(str(out)))
             for sid, opener, (x, y) in streams]
    start = time.perf_counter()
    report = engine.run(specs)
    wall = time.perf_counter() - start
    engine.shutdown()
    frames = sum(o.frames_published for o in report.streams.values())
    failed = {sid: o.error for sid, o in report.streams.items() if not o.ok}
    return {"wall_s": wall, "frames": frames, "fps": frames / wall, "failed": failed,
            "batch_sizes": {str(k): v for k, v in sorted(report.batch_sizes.items())}}


def rss_run(spec: ModelSpec, frames: int, config: EngineConfig, out: Path, backend) -> dict:
    """One long stream; memory of the whole Ray session sampled while it runs (see memory_probe)."""
    done = {"frames": 0}

    def progress(outcome):
        done["frames"] = outcome.frames_published

    stream = StreamSpec("long", functools.partial(SyntheticSource, frames),
                        {1: {0: Prompt(points=[[160, 120]], labels=[1])}}, JsonlOutputs(str(out)))
    engine = Engine(backend, spec, config, on_progress=progress)
    start = time.perf_counter()
    with MemorySampler(lambda: done["frames"]) as sampler:
        report = engine.run([stream])
    engine.shutdown()
    return {"frames": report.streams["long"].frames_published, "wall_s": time.perf_counter() - start,
            **sampler.summary(frames)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60, help="frames per input for the throughput run; 0 skips it")
    parser.add_argument("--rss-frames", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--model", default="sam2.1_hiera_tiny")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = ModelSpec(args.model, None, args.image_size, device)
    delay = get_config(args.model, image_size=args.image_size).max_obj_ptrs_in_encoder - 1
    config = EngineConfig(executor=ExecutorConfig(max_batch_size=4, max_wait_ms=10,
                                                  encoder_gpus=0.5 if device == "cuda" else 0.0,
                                                  tracker_gpus=0.01 if device == "cuda" else 0.0),
                          backward_delay=delay)
    streams = inputs(args.frames)
    print(f"machine: {machine()}")
    backend = RayBackend(init_kwargs={"num_cpus": os.cpu_count()})
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="masklet-bench-"))
    loop = pipe = ratio = None
    if args.frames:
        loop_s, loop_frames = plain_loop(spec, streams)
        loop = {"frames": loop_frames, "wall_s": loop_s, "fps": loop_frames / loop_s}
        print(f"plain loop: {loop_frames} frames in {loop_s:.1f}s = {loop['fps']:.2f} frames/s")
        pipe = pipeline_run(spec, streams, config, scratch, backend)
        ratio = pipe["fps"] / loop["fps"]
        print(f"pipeline:   {pipe['frames']} frames in {pipe['wall_s']:.1f}s = {pipe['fps']:.2f} frames/s")
        print(f"efficiency ratio (pipeline / loop): {ratio:.2f} (goal >= 0.9 on CPU)")
        print(f"encoder batch sizes (size: count): {pipe['batch_sizes']}")
    rss = rss_run(spec, args.rss_frames, config, scratch, backend) if args.rss_frames else None
    if rss:
        print(f"memory over {rss['frames']} frames (PSS of driver + Ray session, MB): second-quarter peak "
              f"{rss['second_quarter_peak_total_pss_mb']:.0f}, last-quarter peak {rss['last_quarter_peak_total_pss_mb']:.0f} "
              f"({rss['pss_growth_last_vs_second_quarter']:+.1%}; flat: {rss['flat']}); summed RSS, which counts "
              f"shared pages once per process: {rss['second_quarter_peak_total_rss_mb']:.0f} -> "
              f"{rss['last_quarter_peak_total_rss_mb']:.0f}")
        for role, r in rss["per_role"].items():
            print(f"  {role:>16} (x{r['second_quarter_peak_processes']:.0f} -> x{r['last_quarter_peak_processes']:.0f}): "
                  f"PSS {r['second_quarter_peak_pss_mb']:6.0f} -> {r['last_quarter_peak_pss_mb']:6.0f} MB, "
                  f"private heap {r['second_quarter_peak_anon_mb']:6.0f} -> {r['last_quarter_peak_anon_mb']:6.0f} MB")
    backend.shutdown()
    result = {"machine": machine(), "model": args.model, "image_size": args.image_size, "device": device,
              "inputs": [s[0] for s in streams], "frames_per_input": args.frames,
              "loop": loop, "pipeline": pipe,
              "efficiency_ratio": ratio, "rss": rss}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline_bench.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'pipeline_bench.json'}")


if __name__ == "__main__":
    main()
