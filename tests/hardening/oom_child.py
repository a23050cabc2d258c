"""Run as `python -m tests.hardening.oom_child`: its own Ray session, whose memory monitor kills an actor.

The memory threshold is set just above what the machine uses now, so only this session's hog
actor (allocating 64 MB at a time) crosses it. Prints one JSON line: what `RayBackend.get`
raised, the raw Ray exception type underneath, and whether a restarted actor answers again
(recovered like a SIGKILL). Separate process: the test session's own Ray stays untouched.
"""
from __future__ import annotations

import json
import os
import sys
import time

CHUNK = 64 * 1024 * 1024
# Allocate this much past the current use, and the monitor steps in. Generous: this machine's
# /proc/meminfo moves by over 1.5 GB while the suite runs (it once read more available than total), and
# a threshold too close to the baseline kills the restarted actor too (seen with 1.5 GB in the suite).
HEADROOM = 4096 * 1024 * 1024


def meminfo() -> tuple[int, int]:
    values = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            name, rest = line.split(":", 1)
            values[name] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


class Hog:
    def __init__(self) -> None:
        self.chunks: list = []

    def ping(self) -> str:
        return "alive"

    def allocate(self, limit: int, hold_s: float) -> str:
        import numpy as np

        while sum(c.nbytes for c in self.chunks) < limit:
            self.chunks.append(np.ones(CHUNK, dtype=np.uint8))  # ones: the pages are really touched
            time.sleep(0.02)
        time.sleep(hold_s)  # the monitor checks every 100 ms: plenty of chances to act
        return f"survived holding {limit >> 20} MB"


def main() -> int:
    total, available = meminfo()
    threshold = min(0.98, (max(total - available, 0) + HEADROOM) / total)
    os.environ["RAY_memory_usage_threshold"] = f"{threshold:.4f}"
    os.environ["RAY_memory_monitor_refresh_ms"] = "100"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, as init_ray does for local sessions
    import ray

    from masklet.actors.backend import ActorCallError, ActorDiedError, RayBackend

    raw_type = None
    # address="local": a new session, never a cluster some other process started with `ray start`.
    backend = RayBackend(init_kwargs={"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False,
                                      "object_store_memory": 80 * 1024 * 1024})
    try:
        hog = backend.spawn("hog", Hog)
        assert backend.get(backend.call(hog, "ping")) == "alive"
        started = time.monotonic()
        future = backend.call(hog, "allocate", 3 * HEADROOM, 20.0)
        try:
            outcome, message = "returned", backend.get(future)
        except ActorDiedError as exc:
            outcome, message = "ActorDiedError", str(exc)
        except ActorCallError as exc:
            outcome, message = "ActorCallError", str(exc)
        try:  # the exception type Ray itself raises for this failure (what the backend maps)
            ray.get(future)
        except Exception as exc:  # noqa: BLE001
            raw_type = type(exc).__name__
        elapsed = time.monotonic() - started
        backend.restart(hog)  # what the engine does on ActorDiedError
        recovered = backend.get(backend.call(hog, "ping"))
    finally:
        backend.shutdown()
    print(json.dumps({"outcome": outcome, "message": message, "raw_type": raw_type, "recovered": recovered,
                      "threshold": round(threshold, 4), "seconds": round(elapsed, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
