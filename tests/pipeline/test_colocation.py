"""GPU-ready by construction, checked on CPU: with `colocate` the encoder and the trackers share one
process (actors.shard), embeddings never cross an actor boundary (no encoder calls, no embedding
payloads in tracker calls: only frame pixels by reference), frames of all streams are still encoded
in one batched pass, results equal the separate layout, and the shard recovers like any tracker."""
from __future__ import annotations

import numpy as np

from masklet.actors.backend import InProcessBackend
from masklet.actors.payloads import EmbeddingPayload, ModelSpec
from masklet.actors.rle import decode_rle
from masklet.actors.shard import FrameKey
from masklet.actors.sinks import JsonlOutputs, read_jsonl_records
from masklet.model.types import Prompt
from masklet.pipeline.config import load_settings
from masklet.pipeline.configure import executor_config
from masklet.pipeline.engine import Engine, StreamSpec
from tests.pipeline.configs import engine_cfg
from tests.pipeline.fakes import fake_opener

FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")


class Spy(InProcessBackend):
    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__()
        self.args: list = []
        self.kill_at, self.runs = kill_at, 0

    def call(self, actor, method, *args, num_returns=1):
        if method == "run":
            self.runs += 1
            self.args += [self._resolve(a) for a in args[1:]]  # what the actor receives
            if self.runs == self.kill_at:
                self.kill(actor)
        return super().call(actor, method, *args, num_returns=num_returns)


def specs(root, n=12):
    objects = {1: {0: Prompt(points=[[20, 20]], labels=[1])}, 2: {3: Prompt(points=[[40, 24]], labels=[1])}}
    return [StreamSpec(f"s{s}", fake_opener(num_frames=n, seed=s), objects, JsonlOutputs(str(root)))
            for s in range(2)]


def masks(folder):
    return {(r.frame_idx, o.object_id): decode_rle(o.rle.model_dump())
            for r in read_jsonl_records(folder / "masklets.jsonl") for o in r.objects}


def run(backend, root, **kw):
    # Small reads (2 frames): 12-frame inputs then take enough tracker rounds for a kill on the 4th.
    config = engine_cfg(max_batch_size=4, max_wait_ms=0, snapshot_every=3, replay_frames=6, backward_delay=1,
                        decode_chunk=2, **kw)
    return Engine(backend, FAKE, config).run(specs(root))


def test_colocated_shard_keeps_embeddings_in_process_and_equals_the_separate_layout(tmp_path):
    separate = run(InProcessBackend(), tmp_path / "separate")
    spy = Spy()
    shard = run(spy, tmp_path / "shard", colocate=True)
    assert all(o.ok for o in shard.streams.values())
    assert not any(method == "encode" for _, method in spy.calls)           # no encoder actor at all
    assert not any(isinstance(a, EmbeddingPayload) for a in spy.args)      # no embedding crossed
    assert any(isinstance(a, FrameKey) for a in spy.args)
    # the pixels travel with the ops, a decoder read's frames as one argument (its pack)
    assert any(isinstance(a, tuple) and a and all(isinstance(f, np.ndarray) for f in a) for a in spy.args)
    assert {name for name, m in spy.calls if m == "run"} == {"shard"}
    assert max(shard.batch_sizes) > 1, shard.batch_sizes  # frames of both streams in one encoder pass
    for s in ("s0", "s1"):
        a, b = masks(tmp_path / "shard" / s), masks(tmp_path / "separate" / s)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert separate.streams["s0"].ok


def test_a_dead_shard_comes_back_and_its_objects_replay(tmp_path):
    reference = run(InProcessBackend(), tmp_path / "ref")
    spy = Spy(kill_at=4)
    report = run(spy, tmp_path / "killed", colocate=True)
    assert report.tracker_restarts == 1 and report.encoder_restarts == 1
    assert all(o.ok for o in report.streams.values()), report.streams
    for s in ("s0", "s1"):
        a, b = masks(tmp_path / "killed" / s), masks(tmp_path / "ref" / s)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert reference.streams["s1"].ok


def test_cuda_colocates_by_default_and_cpu_does_not():
    settings = load_settings()
    gpu = executor_config(settings, ModelSpec("sam2.1_hiera_tiny", None, 256, "cuda"))
    cpu = executor_config(settings, ModelSpec("sam2.1_hiera_tiny", None, 256, "cpu"))
    assert gpu.colocate and gpu.encoder_gpus > 0 and not cpu.colocate and cpu.encoder_gpus == 0
    forced = load_settings(pipeline={"colocate": "on"})
    assert executor_config(forced, ModelSpec("sam2.1_hiera_tiny", None, 256, "cpu")).colocate


def test_live_session_on_a_colocated_shard_matches_the_separate_layout():
    from masklet.actors.messages import PromptMessage
    from masklet.pipeline.live import LiveSession
    from tests.pipeline.configs import live_cfg
    from tests.pipeline.fakes import synthetic_frames

    frames = synthetic_frames(12, 48, 64)
    records = {}
    for colocate in (False, True):
        ses = LiveSession(InProcessBackend(), FAKE, live_cfg(max_batch_size=4, max_wait_ms=0, colocate=colocate))
        outs = []
        for sid in ("a", "b"):
            ses.open_stream(sid, 64, 48)
            ses.submit_prompt(PromptMessage(stream_id=sid, object_id=1, frame_idx=2, action="add",
                                            points=[(15, 22)], labels=[1]))
        for i, rgb in enumerate(frames):
            for sid in ("a", "b"):
                ses.submit_frame(sid, i, i / 25, rgb)
            outs += ses.poll(0.5)
        for _ in range(20):
            outs += ses.poll(0.05)
        records[colocate] = {(o.record.stream_id, o.record.frame_idx): o.record.objects for o in outs}
        ses.shutdown()
    assert len(records[True]) == 24 and records[True] == records[False]
