"""A two-node Ray cluster on loopback: the placement policy spreads tracker actors over both nodes
and keeps the encoder, decoders and publishers on the head (custom resource); removing the node
that hosts trackers mid-run recovers every object on the surviving node, and nothing is lost."""
from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pytest
import ray

from masklet.actors.backend import InProcessBackend, RayBackend
from masklet.actors.payloads import ModelSpec
from masklet.actors.rle import decode_rle
from masklet.actors.sinks import JsonlOutputs, read_jsonl_records
from masklet.model.types import Prompt
from masklet.pipeline.engine import Engine, StreamSpec
from tests.pipeline.configs import engine_cfg
from tests.pipeline.fakes import fake_opener

FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")
FRAMES = 30
IO = (("masklet_io", 1.0),)  # only the head node offers it


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # Every node on 127.0.0.1, as masklet's own sessions (actors.backend.init_ray): with Ray's cluster
    # mode on, 127.0.0.1 is "resolved" to the machine's outward address, which need not be reachable.
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    c = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 2, "resources": {"masklet_io": 100}, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        # a removed node is noticed in ~10 s instead of ~30 s (3 missed checks may fail a live node under load)
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 10,
                           "health_check_initial_delay_ms": 1000}})
    worker = c.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    _wait_until_every_node_runs_actors(2, timeout_s=120)
    yield c, worker
    ray.shutdown()
    c.shutdown()


@ray.remote(num_cpus=0)
class _Probe:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _wait_until_every_node_runs_actors(nodes: int, timeout_s: float) -> None:
    """Wait until an actor pinned to each node starts there.

    `wait_for_nodes` only waits for the GCS to register the node; it may not yet take actors. The
    executor pins each tracker to a node (actors.backend.RayBackend._spread_strategy), so probe with
    the same hard node affinity, one probe per node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    deadline = time.monotonic() + timeout_s
    ids = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    assert len(ids) == nodes, f"{len(ids)} of {nodes} nodes alive"
    probes = [_Probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=i, soft=False)).remote()
              for i in ids]
    seen = ray.get([p.node.remote() for p in probes], timeout=max(1.0, deadline - time.monotonic()))
    for p in probes:
        ray.kill(p)
    assert sorted(seen) == sorted(ids), (seen, ids)


def specs(root):
    objects = {1: {0: Prompt(points=[[20, 20]], labels=[1])}, 2: {2: Prompt(points=[[40, 24]], labels=[1])}}
    return [StreamSpec(f"s{s}", fake_opener(num_frames=FRAMES, seed=s), objects, JsonlOutputs(str(root)),
                       bidirectional=False) for s in range(2)]


def masks(folder):
    return {(r.frame_idx, o.object_id): decode_rle(o.rle.model_dump())
            for r in read_jsonl_records(folder / "masklets.jsonl") for o in r.objects}


def test_trackers_spread_over_nodes_and_survive_the_loss_of_one(cluster, tmp_path):
    c, worker = cluster
    config = engine_cfg(max_batch_size=2, max_wait_ms=1, snapshot_every=3, replay_frames=8, queue_capacity=4,
                        objects_per_tracker=1, encoder_resources=IO, io_resources=IO, spread=True)
    placed: dict[str, str] = {}

    before_removal: list = []
    on_worker: set = set()  # (stream, object) hosted on the removed node when it went

    def remove_worker(engine, outcome):
        if not placed and outcome.frames_published >= 4:
            actors = engine.executor.report()["actors"]
            placed.update({name: rep["node"] for name, rep in actors.items()})
            before_removal.append(engine.executor.stats.snapshot().total("masklet_object_recoveries_total"))
            head_now = ray.get_runtime_context().get_node_id()
            pool = engine.executor.trackers
            on_worker.update((key.stream_id, key.object_id) for actor in pool.actors
                             if placed.get(actor.name, head_now) != head_now for key in pool.members_of(actor))
            c.remove_node(worker, allow_graceful=False)
            # A lost machine takes its processes with it at once; Ray's workers on a removed local
            # node would otherwise go on answering for a moment (measured: long enough for a stream
            # of the fast fake model to finish, and the loss to go unnoticed).
            for name, rep in actors.items():
                if rep["node"] != head_now:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rep["pid"], signal.SIGKILL)

    backend = RayBackend()
    engine = Engine(backend, FAKE, config, on_progress=lambda outcome: remove_worker(engine, outcome))
    report = engine.run(specs(tmp_path / "cluster"))
    engine.shutdown()
    reference = Engine(InProcessBackend(), FAKE, config).run(specs(tmp_path / "ref"))

    head = ray.get_runtime_context().get_node_id()
    trackers = {name: node for name, node in placed.items() if name.startswith("tracker")}
    # spread over both nodes (the message says which node is the head and whether any object had
    # already been recovered before the removal, e.g. after a falsely failed health check)
    assert len(trackers) == 4 and len(set(trackers.values())) == 2, (placed, head, before_removal, report.events[:6])
    assert all(node == head for name, node in placed.items() if not name.startswith("tracker")), placed
    # Every object the removed node hosted recovers, unless its stream had already finished when the
    # loss was noticed (the fake model is fast: a stream can publish its last frames meanwhile).
    first_restart = next((i for i, e in enumerate(report.events) if e.kind == "tracker_restarted"), None)
    assert first_restart is not None, ("the node loss was never noticed", report.events)
    done_before = {e.stream_id for e in report.events[:first_restart] if e.kind == "stream_done"}
    recovered = {(e.stream_id, int(e.message.split()[1].rstrip(":"))) for e in report.events
                 if e.kind == "object_recovered"}
    expected = {k for k in on_worker if k[0] not in done_before}
    assert report.tracker_restarts >= 1 and expected and expected <= recovered <= on_worker, (report.events, placed,
                                                                                             on_worker)
    assert all(n == head for n in (rep["node"] for name, rep in report.actors.items()))  # survivors only
    for s in ("s0", "s1"):
        assert report.streams[s].ok and report.streams[s].frames_published == FRAMES, report.streams[s]
        got, want = masks(tmp_path / "cluster" / s), masks(tmp_path / "ref" / s)
        assert got.keys() == want.keys() and len(got) == 2 * FRAMES - 2  # object 2 starts at frame 2
        assert all(np.array_equal(got[k], want[k]) for k in want), s
