"""Process-level helpers for code that runs inside actor processes (threads, memory, where am I)."""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Optional

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


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    """glibc, for its allocator's knobs (`malloc_trim`, `mallopt`); None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A batched tracker pass frees tens of MB of activations, but glibc keeps them: its mmap threshold
    rises after the first large frees, so later large tensors come from the heap and stay resident
    when freed. Measured (tiny at 256 px, 8 objects, 20 frames, one process): 68-144 MB retained at
    8 objects per pass, 6 MB at one per pass; trimming after each call left none, at no measurable
    CPU cost (17.4-18.5 s against 17.5 s). A fixed 1 MB mmap threshold also bounds it but cost 60%
    more CPU (page faults on every large tensor)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Serve allocations up to `mmap_threshold` from the heap and keep up to `trim_threshold` of freed
    heap mapped (glibc `mallopt`; False elsewhere). For a process that allocates and frees
    frame-sized arrays all the time (a decoder: every frame is a fresh 2.7 MB array at 720p, freed
    once it is in the object store): by default glibc hands such memory back to the OS and the next
    frame faults every page in again. Page faults are expensive on VMs: on this project's 2-core
    machine a fresh 2.7 MB buffer took 3.2 ms to fill against 0.12 ms for a reused one. The
    opposite of `release_free_memory`, which trackers use for their one-off large activations."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


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
