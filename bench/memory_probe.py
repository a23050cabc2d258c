"""Memory of a Ray session, summed without double counting (Linux /proc; psutil is not a dependency).

Summing per-process RSS overstates a Ray session badly: every worker maps the same torch shared
libraries and the same object-store pages, and RSS counts them once per process. PSS (proportional
set size) splits each shared page among the processes mapping it, so the PSS of all processes adds
up to the memory actually used. The probe reports PSS, private anonymous memory (heap: what a leak
grows) and plain RSS per role (driver, raylet, EncoderActor, TrackerActor, ...).
"""
from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

from masklet.monitoring.processes import descendant_pids

_KEYS = {"Rss:": "rss", "Pss:": "pss", "Anonymous:": "anon"}


def _role(pid: str, cmdline: bytes) -> str:
    if pid == str(os.getpid()):
        return "driver"
    if cmdline.startswith(b"ray::"):
        # "ray::EncoderActor.encode", "ray::IDLE" or, for named actors, "ray::<name>:TrackerActor.step"
        title = cmdline[5:].split(b"\0")[0].decode(errors="replace")
        return title.rsplit(":", 1)[-1].split(".")[0] or "worker"
    head = cmdline[:300]
    for marker in (b"raylet", b"gcs_server", b"dashboard", b"log_monitor", b"monitor.py"):
        if marker in head:
            return marker.decode().removesuffix(".py")
    return "other"


def _memory_kb(pid: str) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = _KEYS.get(line.split(" ", 1)[0])
        if key:
            out[key] = int(line.split()[1])
    return out


def sample() -> dict[str, dict[str, float]]:
    """Role -> {"pss_mb", "anon_mb", "rss_mb", "processes"} for the driver and the Ray session it started."""
    roles: dict[str, dict[str, float]] = defaultdict(lambda: {"pss_mb": 0.0, "anon_mb": 0.0, "rss_mb": 0.0, "processes": 0})
    for pid in descendant_pids(os.getpid()):
        entry = Path("/proc") / str(pid)
        try:
            role = _role(entry.name, (entry / "cmdline").read_bytes())
            kb = _memory_kb(entry.name)
        except OSError:
            continue  # exited meanwhile
        acc = roles[role]
        acc["pss_mb"] += kb.get("pss", 0) / 1024
        acc["anon_mb"] += kb.get("anon", 0) / 1024
        acc["rss_mb"] += kb.get("rss", 0) / 1024
        acc["processes"] += 1
    return dict(roles)


def total(snapshot: dict[str, dict[str, float]], key: str = "pss_mb") -> float:
    return sum(r[key] for r in snapshot.values())


class MemorySampler:
    """Samples `sample()` every `interval_s` on a thread, tagging each sample with a progress value."""

    def __init__(self, progress=lambda: 0, interval_s: float = 2.0) -> None:
        self.progress, self.interval_s = progress, interval_s
        self.samples: list[tuple[float, int, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.progress(), sample()))
            self._stop.wait(self.interval_s)

    def summary(self, frames: int) -> dict:
        """Peaks in the second and last quarter of the stream (by frames done; the first quarter is warm-up:
        models load, actors start), per role and in total, and whether the total stayed flat."""
        def window(lo: float, hi: float):
            return [s for _, p, s in self.samples if lo * frames <= p <= hi * frames] or [self.samples[-1][2]]

        early, late = window(0.25, 0.5), window(0.75, 1.0)
        roles = sorted({r for _, _, s in self.samples for r in s})
        per_role = {}
        for role in roles:
            per_role[role] = {f"{q}_peak_{k}": round(max(s.get(role, {}).get(k, 0.0) for s in w), 1)
                              for q, w in (("second_quarter", early), ("last_quarter", late))
                              for k in ("pss_mb", "anon_mb", "processes")}
        out = {"samples": len(self.samples), "per_role": per_role}
        for key in ("pss_mb", "anon_mb", "rss_mb"):
            out[f"second_quarter_peak_total_{key}"] = round(max(total(s, key) for s in early), 1)
            out[f"last_quarter_peak_total_{key}"] = round(max(total(s, key) for s in late), 1)
        out["overall_peak_total_pss_mb"] = round(max(total(s) for _, _, s in self.samples), 1)
        growth = out["last_quarter_peak_total_pss_mb"] / out["second_quarter_peak_total_pss_mb"] - 1
        out["pss_growth_last_vs_second_quarter"] = round(growth, 4)
        out["flat"] = growth <= 0.05
        return out
