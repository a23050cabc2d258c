"""`make demo`: `masklet segment` on a short clip with the official sam2.1_hiera_tiny checkpoint, then
the same clip as a live stream through the embedded Kafka broker (deploy/demo_live.py).

    .venv/bin/python -m masklet.deploy.demo [--out DIR] [--image-size N] [--backend ray|inprocess] [--no-live]

The clip is generated here (48 frames of moving coloured shapes), so the demo needs no video
from anywhere; set MASKLET_DEMO_INPUT=/path/to/video to segment your own file instead (the
click then goes to the frame centre). The checkpoint is downloaded once into the cache
(MASKLET_CACHE_DIR, else ~/.cache/masklet) and the job runs with `--checkpoint auto`.

Offline, the demo says so in one line and runs the very same job with random weights on the
generated clip: a SMOKE RUN that proves the whole path (decode, encoder, trackers, publisher,
sinks) while its masks mean nothing. It is labelled as such in the terminal, on every preview
frame, in its output folder name and in a SMOKE_RUN.txt beside the outputs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import av
import numpy as np

from masklet.deploy.demo_live import DEMO_MODEL

INPUT_ENV = "MASKLET_DEMO_INPUT"
DEFAULT_OUT = Path("demo-out")
CLIP_NAME = "sample.mp4"
CLIP_FRAMES, CLIP_WIDTH, CLIP_HEIGHT, CLIP_FPS = 48, 320, 240, 24
# The click lands on the red disc at this frame; frames before it are covered by backward propagation.
CLICK_FRAME = 8
# 512 px keeps the official weights' masks useful while 48 frames finish in about a minute on 2 CPUs
# (1024, the CLI default, costs ~4x in the encoder and ~16x in memory attention).
REAL_IMAGE_SIZE = 512
SMOKE_IMAGE_SIZE = 256
MAX_FRAMES = 48  # caps a user-supplied MASKLET_DEMO_INPUT, so the demo stays a demo

SMOKE_BANNER_LINES = (
    "SMOKE RUN: RANDOM WEIGHTS, THE MASKS ARE MEANINGLESS",
    "It only proves the pipeline end to end (decode -> encoder -> trackers -> publisher -> sinks).",
)


# -- the sample clip -----------------------------------------------------------------------------


def red_disc_centre(frame_idx: int, width: int = CLIP_WIDTH, height: int = CLIP_HEIGHT) -> tuple[int, int]:
    """Where the generated clip's red disc is on `frame_idx` (it glides left to right)."""
    return 50 + frame_idx * (width - 100) // max(CLIP_FRAMES - 1, 1), height // 2 - 30


def generate_clip(path: Path, num_frames: int = CLIP_FRAMES, width: int = CLIP_WIDTH,
                  height: int = CLIP_HEIGHT, fps: int = CLIP_FPS) -> Path:
    """An H.264 clip of a red disc, a green square and a blue bar moving over a soft gradient."""
    ys, xs = np.mgrid[0:height, 0:width]
    background = np.stack([40 + xs * 60 // width, 50 + ys * 60 // height, np.full_like(xs, 90)], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for i in range(num_frames):
            rgb = background.copy()
            cx, cy = red_disc_centre(i, width, height)
            rgb[(xs - cx) ** 2 + (ys - cy) ** 2 <= 26 ** 2] = (220, 30, 40)
            sx, sy = width - 90 - i * 2, height - 80 + int(10 * np.sin(i / 5))
            rgb[sy:sy + 44, sx:sx + 44] = (40, 200, 70)
            bx = 20 + (i * 5) % (width - 60)
            rgb[12:30, bx:bx + 50] = (40, 90, 230)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _frame_centre(path: str) -> tuple[int, int]:
    from masklet.actors.sources import open_source

    with open_source(path, max_frames=1) as source:
        return source.width // 2, source.height // 2


# -- the run -------------------------------------------------------------------------------------


def fetch_official_checkpoint() -> Path:
    """Download (or find cached) the official weights that `--checkpoint auto` will then use.

    Done up front, with a single retry, so that an offline machine is detected in about a second
    instead of inside the segment job after the full retry back-off.
    """
    from masklet.model.checkpoints import download_checkpoint

    return download_checkpoint(DEMO_MODEL, retries=1)


def segment_command(input_path: str, point: str, out: Path, checkpoint: str, image_size: int, backend: str) -> list[str]:
    return ["segment", input_path, "--point", point, "--out", str(out), "--model", DEMO_MODEL,
            "--checkpoint", checkpoint, "--image-size", str(image_size), "--max-frames", str(MAX_FRAMES),
            "--backend", backend]


def _banner(lines: Sequence[str]) -> str:
    width = max(len(line) for line in lines) + 4
    rule = "#" * width
    return "\n".join([rule, *(f"# {line.ljust(width - 4)} #" for line in lines), rule])


def _describe_outputs(folder: Path) -> list[str]:
    if not folder.is_dir():
        return [f"  {folder}/ (missing: the job failed, see the error above)"]
    return [f"  {p}" for p in sorted(folder.iterdir()) if p.is_file()]


def main(argv: Sequence[str] | None = None) -> int:
    from masklet.model.checkpoints import CheckpointDownloadError
    from masklet.deploy.cli import main as masklet_main

    parser = argparse.ArgumentParser(prog="python -m masklet.deploy.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    parser.add_argument("--image-size", type=int, default=REAL_IMAGE_SIZE, help="model input size with real weights")
    # In-process by default: on a 2-CPU machine Ray's start-up and per-actor model copies cost more
    # than its parallelism gains for one short clip. `--backend ray` runs the CLI default.
    parser.add_argument("--backend", default="inprocess", choices=("inprocess", "ray"))
    parser.add_argument("--no-live", action="store_true", help="skip the live path (embedded Kafka broker)")
    args = parser.parse_args(argv)
    out: Path = args.out

    user_input = os.environ.get(INPUT_ENV)
    try:
        checkpoint_path = fetch_official_checkpoint()
    except CheckpointDownloadError as exc:
        checkpoint_path = None
        print(f"masklet demo: offline: the official {DEMO_MODEL} checkpoint could not be downloaded ({exc})",
              flush=True)

    smoke = checkpoint_path is None
    if smoke:
        # Random weights only make sense as a pipeline check, so always on the generated clip.
        job_out = out / "smoke-run"
        input_path = str(generate_clip(out / CLIP_NAME))
        point = "{},{}@{}".format(*red_disc_centre(CLICK_FRAME), CLICK_FRAME)
        command = segment_command(input_path, point, job_out, "random", SMOKE_IMAGE_SIZE, args.backend)
        print(_banner(SMOKE_BANNER_LINES), flush=True)
        job_out.mkdir(parents=True, exist_ok=True)
        (job_out / "SMOKE_RUN.txt").write_text("\n".join(SMOKE_BANNER_LINES) + "\n"
                                              f"Command: masklet {' '.join(command)}\n")
    else:
        job_out = out
        if user_input:
            input_path = user_input
            point = "{},{}".format(*_frame_centre(user_input))
        else:
            input_path = str(generate_clip(out / CLIP_NAME))
            point = "{},{}@{}".format(*red_disc_centre(CLICK_FRAME), CLICK_FRAME)
        command = segment_command(input_path, point, job_out, "auto", args.image_size, args.backend)
        print(f"masklet demo: {DEMO_MODEL} weights at {checkpoint_path}", flush=True)

    print(f"masklet demo: running: masklet {' '.join(command)}", flush=True)
    code = masklet_main(command)

    stem_dir = job_out / Path(input_path.rstrip("/")).stem
    print()
    if smoke:
        print(_banner(SMOKE_BANNER_LINES))
    print(f"masklet demo: {'SMOKE RUN ' if smoke else ''}outputs in {stem_dir}/:")
    print("\n".join(_describe_outputs(stem_dir)))
    if smoke:
        print(f"To segment for real, get {DEMO_MODEL}.pt on a machine with internet and pass it with an input:")
        print(f"  masklet segment INPUT --point x,y --checkpoint /path/to/{DEMO_MODEL}.pt --out DIR")
        print(f"or put it in the cache (MASKLET_CACHE_DIR) and rerun `make demo` ({INPUT_ENV}=VIDEO for your own clip).")
    if code != 0:
        print(f"masklet demo: the segment job exited with status {code}", file=sys.stderr)
        return code
    if args.no_live:
        return code
    from masklet.deploy.demo_live import run_live_demo

    px, py = (int(v) for v in point.split("@")[0].split(","))
    click = int(point.split("@")[1]) if "@" in point else 0
    code = run_live_demo(Path(input_path), job_out, checkpoint=None if smoke else str(checkpoint_path),
                         image_size=SMOKE_IMAGE_SIZE if smoke else args.image_size, point=(px, py),
                         click_frame=click, smoke=smoke)
    if smoke:
        print(_banner(SMOKE_BANNER_LINES))
    return code


if __name__ == "__main__":
    sys.exit(main())
