"""What the benchmarks share: the shared clips, the machine description, and the plain loop that
does a pipeline's model calls in one process, frame by frame (the baseline a pipeline must beat)."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def clips() -> list[Path]:
    folder = Path(os.environ.get("MASKLET_TEST_VIDEOS", ROOT.parent / "shared" / "videos"))
    found = sorted(folder.glob("*.mp4"))
    if not found:
        raise SystemExit(f"no clips in {folder}; set MASKLET_TEST_VIDEOS")
    return found


def git_commit() -> str:
    """The short commit the benchmark ran on (its JSON names it)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1]).stdout.strip()


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        info["cpu"] = model
    except (OSError, StopIteration):
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def percentile_ms(values: list[float], q: float) -> float | None:
    """The `q` quantile (nearest rank, 1.0 = the worst) of durations in seconds, in ms; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def process_cpu(pid: int) -> tuple[float, str] | None:
    """(user + system CPU seconds, command name) of process `pid` from /proc; None once it exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), stat[stat.index("(") + 1:stat.rindex(")")]
    except (OSError, ValueError, IndexError):
        return None


def cpu_by_process() -> dict[int, tuple[float, str]]:
    """`process_cpu` of every process now."""
    found = {int(e.name): process_cpu(int(e.name)) for e in Path("/proc").iterdir() if e.name.isdigit()}
    return {pid: cpu for pid, cpu in found.items() if cpu is not None}


def tree_cpu_s(root: int | None = None) -> float:
    """User + system CPU seconds of process `root` (default: this one) and every live descendant
    (a Ray session this process started: GCS, raylet, workers), from /proc. A process that exited
    meanwhile drops out, so take differences over windows in which the tree stays up."""
    from masklet.monitoring.processes import descendant_pids

    cpus = (process_cpu(pid) for pid in descendant_pids(os.getpid() if root is None else root))
    return sum(cpu[0] for cpu in cpus if cpu is not None)


def plain_loop(spec, paths, points, frames: int, open_fn=None) -> dict:
    """One process, no pipeline: decode, encode (one frame per pass), step every object, build the
    record (RLE, bbox, area, JSON) -- the same model calls and outputs as the pipeline."""
    import torch

    from masklet.actors.payloads import FrameMeta, ObjectResult
    from masklet.actors.publisher import build_record
    from masklet.actors.sources import open_source
    from masklet.model.types import Prompt

    torch.manual_seed(spec.seed)
    model = spec.build()
    start, count = time.perf_counter(), 0
    open_fn = open_fn or (lambda path: open_source(str(path), max_frames=frames))
    for path in paths:
        source = open_fn(path)
        try:
            trackers = None
            for frame in source.frames():
                h, w = frame.rgb.shape[:2]
                with torch.inference_mode():
                    emb = model.encode(frame.rgb[None])[0]
                    if trackers is None:
                        trackers = [model.new_tracker((h, w)) for _ in points]
                        results = [t.step(frame.frame_idx, emb, Prompt(points=[[x, y]], labels=[1]))
                                   for t, (x, y) in zip(trackers, points)]
                    else:
                        results = [t.step(frame.frame_idx, emb) for t in trackers]
                objects = [ObjectResult(i + 1, frame.frame_idx, r.low_res_logits[0].numpy(), r.score, r.iou, (h, w))
                           for i, r in enumerate(results)]
                build_record(FrameMeta("s", frame.frame_idx, frame.pts, w, h), objects, spec.name).to_json_bytes()
                count += 1
        finally:
            if hasattr(source, "close"):
                source.close()
    wall = time.perf_counter() - start
    return {"frames": count, "wall_s": round(wall, 2), "fps": round(count / wall, 2)}
