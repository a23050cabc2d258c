"""Issue 12, item 4: every failure of an actor is an actor death (ActorDiedError), recovered like a SIGKILL."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from masklet.actors.backend import ActorCallError, ActorDiedError, ray_failure

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_an_oom_kill_by_rays_memory_monitor_is_an_actor_death_and_the_actor_restarts():
    """A real OOM kill: a separate Ray session whose memory threshold sits just above the machine's
    current use; its one actor allocates until the memory monitor kills it. Ray raises
    OutOfMemoryError (not a RayActorError), which RayBackend.get used to let through."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-m", "tests.hardening.oom_child"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, f"rc={done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    report = json.loads(lines[-1])
    print(report)
    assert report["raw_type"] == "OutOfMemoryError", report  # what Ray raises for this failure
    assert report["outcome"] == "ActorDiedError", report      # what the pipeline sees
    assert "memory" in report["message"].lower(), report
    assert report["recovered"] == "alive", report             # restarted like after a SIGKILL


def _task_error(cause: BaseException) -> BaseException:
    """A RayTaskError as ray.get raises it for an exception inside an actor method."""
    error = ray.exceptions.RayTaskError("Tracker.step", "Traceback: ...", cause)
    return error.as_instanceof_cause()


@pytest.mark.parametrize("raised", [
    ray.exceptions.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory"),
    ray.exceptions.NodeDiedError("node 10.0.0.7 died"),
    ray.exceptions.WorkerCrashedError(),
    ray.exceptions.LocalRayletDiedError(),
    ray.exceptions.ActorDiedError(),
    ray.exceptions.ActorUnavailableError("unavailable", None),
    ray.exceptions.ObjectLostError("00" * 28, "owner", "call site"),
    ray.exceptions.RaySystemError("system error"),
    ray.exceptions.ActorUnschedulableError("no node fits"),
    _task_error(MemoryError("cannot allocate")),           # inside the method: state may be half-updated
    _task_error(ray.exceptions.OutOfMemoryError("nested")),
    _task_error(ActorDiedError("stub crash")),
], ids=lambda e: type(e).__name__)
def test_every_ray_failure_of_an_actor_is_an_actor_death(raised):
    mapped = ray_failure(ray, raised)
    assert isinstance(mapped, ActorDiedError), (type(raised).__name__, mapped)
    assert "\n" not in str(mapped)  # one line for logs and events


def test_an_exception_of_the_method_itself_stays_a_call_error():
    mapped = ray_failure(ray, _task_error(ValueError("frame 7 has the wrong size\nmore detail")))
    assert isinstance(mapped, ActorCallError) and mapped.kind == "ValueError"
    assert mapped.reason == "frame 7 has the wrong size"


def test_a_non_ray_exception_passes_through_unchanged():
    error = KeyError("caller bug")
    assert ray_failure(ray, error) is error
