"""Process-level helpers for code that runs inside actor processes (threads, where am I)."""
from __future__ import annotations

import os
import sys

# Passive OpenMP waits in every stage process: an encoder spinning at its barriers while trackers
# and publishers need the cores wastes CPU. libgomp reads this when torch loads it, and actor
# modules import this one before torch. (Set here rather than as a Ray runtime_env: an actor with
# its own runtime_env cannot start on a prestarted worker, which costs seconds of start-up.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def limit_threads(num_threads: int | None) -> None:
    """Cap intra-op threads: many actors on few cores must not each spawn one thread per core."""
    if num_threads:
        os.environ["OMP_NUM_THREADS"] = str(num_threads)  # also covers a torch imported later
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(num_threads)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def in_actor_process() -> bool:
    """Whether this code runs inside a Ray worker (not in the driver, nor in-process)."""
    ray = sys.modules.get("ray")
    try:
        return ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - an older/newer Ray without these attributes
        return False


def actor_pid() -> int:
    return os.getpid()


def node_id() -> str:
    """The Ray node this process runs on ("local" outside Ray): placement tests and stats use it."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        pass
    return "local"
