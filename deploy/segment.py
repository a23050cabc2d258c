"""`masklet segment INPUT... --out DIR`: the offline job over files, folders and URLs.

All inputs run concurrently through one engine, so their frames share the batched encoder.
Outputs go to DIR/<input stem>/: masklets.jsonl, per-object mask (or alpha) videos, preview.mp4.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Sequence

from masklet.actors.payloads import ModelSpec
from masklet.actors.sinks import SegmentOutputs
from masklet.deploy.model_args import add_model_arguments, model_overrides
from masklet.model.types import Prompt
from masklet.pipeline.engine import Engine, EngineConfig, EngineEvent, StreamOutcome, StreamSpec

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --checkpoint random: the model has RANDOM WEIGHTS. The masks are MEANINGLESS; "
    "this run only exercises the pipeline (smoke test)."
)
SMOKE_BANNER = "SMOKE RUN - random weights - masks are meaningless"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("segment", help="segment objects in video files, folders or URLs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video file, image folder, folder of video files (an archive) or http(s)/rtsp URL")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (one subfolder per input)")
    p.add_argument("--point", action="append", default=[], metavar="x,y[@frame]", help="one object per flag, every input")
    p.add_argument("--box", action="append", default=[], metavar="x0,y0,x1,y1[@frame]", help="one object per flag")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="per-input objects (JSON or YAML)")
    add_model_arguments(p)
    p.add_argument("--max-frames", type=int, metavar="N", help="stop each input after N frames")
    p.add_argument("--soft-masks", action="store_true", help="8-bit alpha mattes from the logits instead of binary masks")
    p.add_argument("--no-preview", action="store_true", help="skip preview.mp4")
    p.add_argument("--no-mask-videos", action="store_true", help="write masklets.jsonl only (no per-object videos)")
    p.add_argument("--backend", choices=("ray", "inprocess"), help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help="YAML config (pipeline batching, queues, snapshots)")
    p.set_defaults(func=run_segment)


def _usage_error(message: str) -> int:
    print(f"masklet segment: error: {message}", file=sys.stderr)
    return 2


def _to_model_prompt(p: Any, max_pixels: int) -> Prompt:
    mask = p.load_mask(max_pixels)
    if mask is not None:
        return Prompt(mask=mask)
    return Prompt(points=list(p.points) or None, labels=list(p.labels) or None,
                  box=None if p.box is None else list(p.box))


def _stream_ids(inputs: Sequence[str]) -> list[str]:
    ids, seen = [], {}
    for text in inputs:
        stem = Path(text.rstrip("/")).stem or "input"
        seen[stem] = seen.get(stem, 0) + 1
        ids.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return ids


def run_segment(args: argparse.Namespace) -> int:
    from masklet.model.checkpoints import CheckpointError
    from masklet.pipeline.config import ConfigError, load_settings
    from masklet.pipeline.configure import engine_config, model_spec
    from masklet.deploy.prompt_specs import PromptSpecError, build_prompt_spec
    from masklet.actors.sources import expand_inputs, open_source

    args.inputs = expand_inputs(list(args.inputs))  # an archive folder stands for its videos
    try:
        settings = load_settings(args.config, model=model_overrides(args))
        limits = settings.limits.input_limits()
        spec = build_prompt_spec(args.point, args.box, args.prompts, limits=limits)
        spec.check_object_limits(args.inputs, limits)  # each object is a tracker process: refuse before starting
        if args.max_frames is not None and args.max_frames < 1:
            raise ValueError(f"--max-frames must be at least 1, got {args.max_frames}")
        objects_per_input = []
        for text in args.inputs:
            objects: dict[int, dict[int, Prompt]] = {}
            for p in spec.prompts_for(text):
                objects.setdefault(p.object_id, {})[p.frame_idx] = _to_model_prompt(p, settings.pipeline.max_pixels)
            objects_per_input.append(objects)
    except (ConfigError, PromptSpecError, ValueError) as exc:
        return _usage_error(str(exc))

    random_weights = settings.model.checkpoint == "random"
    if random_weights:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    try:
        model = model_spec(settings)
    except (CheckpointError, ValueError) as exc:
        print(f"masklet segment: error: {exc}", file=sys.stderr)
        return 1
    ps = settings.pipeline
    config = engine_config(settings, model, soft_masks=args.soft_masks)

    streams = []
    for text, sid, objects in zip(args.inputs, _stream_ids(args.inputs), objects_per_input):
        opener = functools.partial(open_source, text, max_pixels=ps.max_pixels, max_frames=args.max_frames)
        outputs = SegmentOutputs(str(args.out / sid), args.soft_masks, not args.no_preview,
                                 SMOKE_BANNER if random_weights else None, mask_videos=not args.no_mask_videos)
        streams.append(StreamSpec(sid, opener, objects, outputs, bidirectional=True))
    names = dict(zip(_stream_ids(args.inputs), args.inputs))
    return _run_with_progress(streams, names, model, config, args.backend or ps.backend, args.out)


def _make_backend(kind: str):
    from masklet.actors.backend import InProcessBackend, RayBackend

    return InProcessBackend() if kind == "inprocess" else RayBackend()


def _run_with_progress(streams: list[StreamSpec], names: dict[str, str], model: ModelSpec, config: EngineConfig,
                       backend_kind: str, out_dir: Path) -> int:
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}
    for i, s in enumerate(streams):
        bars[s.stream_id] = tqdm(desc=s.stream_id, unit="frame", position=i, leave=True, dynamic_ncols=True,
                                 file=sys.stderr)

    def on_progress(outcome: StreamOutcome) -> None:
        bar = bars[outcome.stream_id]
        if outcome.frames_total and bar.total != outcome.frames_total:
            bar.total = outcome.frames_total
        bar.update(outcome.frames_published - bar.n)

    def on_event(event: EngineEvent) -> None:
        if event.kind == "stream_failed":
            reason = event.message
            name = names.get(event.stream_id, event.stream_id)
            if not reason.startswith(str(name)):
                reason = f"{name}: {reason}"
            tqdm.write(f"masklet segment: error: {reason}", file=sys.stderr)
        elif event.kind in ("sink_error", "encoder_restarted", "tracker_restarted"):
            tqdm.write(f"masklet segment: warning: {event.stream_id or 'encoder'}: {event.message}", file=sys.stderr)

    backend = _make_backend(backend_kind)
    engine = Engine(backend, model, config, on_event=on_event, on_progress=on_progress)
    try:
        report = engine.run(streams)
    finally:
        engine.shutdown()
        for bar in bars.values():
            bar.close()
        backend.shutdown()
    print(summary_table(report.streams.values(), out_dir, report.batch_sizes, report.tracker_batch_sizes,
                        len([n for n in report.actors if n.startswith("tracker")])))
    return 0 if all(o.ok for o in report.streams.values()) else 1


def summary_table(outcomes: Any, out_dir: Path, batch_sizes: Any, tracker_batch_sizes: Any = None,
                  tracker_actors: int = 0) -> str:
    rows = [("input", "frames", "objects", "fps", "status", "outputs")]
    for o in outcomes:
        seconds = max(o.finished - o.started, 1e-9)
        status = "ok" if o.ok else ("FAILED" if o.error else "SINK ERRORS")
        rows.append((o.stream_id, str(o.frames_published), str(o.objects), f"{o.frames_published / seconds:.1f}",
                     status, str(out_dir / o.stream_id) if o.error is None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    sizes = ", ".join(f"{size}x{count}" for size, count in sorted(batch_sizes.items())) or "none"
    lines.append(f"encoder batches (size x count): {sizes}")
    if tracker_batch_sizes:
        steps = ", ".join(f"{size}x{count}" for size, count in sorted(tracker_batch_sizes.items()))
        lines.append(f"tracker steps (objects x count): {steps} on {tracker_actors} tracker process(es)")
    return "\n".join(lines)
