"""Objects as rows: tracker actors host many objects of many streams, processes are reused across
inputs, capacity 1 still gives one actor per object, and a dead tracker actor's objects recover.
In-process here (fake model, and the real model for batched == one-by-one); the Ray variants are
in test_segment_ray.py."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from masklet.actors.backend import InProcessBackend
from masklet.actors.payloads import ModelSpec
from masklet.actors.rle import decode_rle
from masklet.actors.sinks import JsonlOutputs, read_jsonl_records
from masklet.actors.sources import open_source
from masklet.actors.tracker import ObjectKey
from masklet.model.types import Prompt
from masklet.pipeline.engine import Engine, StreamSpec
from masklet.pipeline.placement import ActorPool
from tests.pipeline.configs import engine_cfg
from tests.pipeline.fakes import fake_opener

FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")


def point(x, y):
    return Prompt(points=[[x, y]], labels=[1])


def streams(tmp_path, n_streams=3, n_objects=2, frames=12, sub="out"):
    out = []
    for s in range(n_streams):
        objects = {o + 1: {o: point(10 + 6 * o, 20)} for o in range(n_objects)}
        out.append(StreamSpec(f"s{s}", fake_opener(num_frames=frames, seed=s), objects,
                              JsonlOutputs(str(tmp_path / sub))))
    return out


def masks(folder):
    return {(r.frame_idx, o.object_id): decode_rle(o.rle.model_dump())
            for r in read_jsonl_records(folder / "masklets.jsonl") for o in r.objects}


def tracker_actors(backend: InProcessBackend) -> set[str]:
    return {name for name, method in backend.calls if method == "run"}


def test_objects_pack_onto_one_tracker_actor_and_processes_are_reused_across_inputs(tmp_path):
    backend = InProcessBackend()
    report = Engine(backend, FAKE, engine_cfg(max_batch_size=4, max_wait_ms=0)).run(streams(tmp_path))
    assert all(o.ok for o in report.streams.values())
    assert tracker_actors(backend) == {"tracker-0"}  # 6 objects of 3 inputs, one process
    assert {name for name, _ in backend.calls if name.startswith("decoder")} == {"decoder-0"}
    # the first two streams get a publisher each (publishers_before_sharing), the third shares one
    assert {name for name, _ in backend.calls if name.startswith("publisher")} <= {"publisher-0", "publisher-1"}
    # objects of different streams went through one tracker call together
    assert max(report.tracker_batch_sizes) == 1  # the fake model has no step_many: one pass per object
    assert sum(report.tracker_batch_sizes.values()) == sum(len(s.objects) * 12 for s in streams(tmp_path))


def test_capacity_one_gives_one_actor_per_object_with_identical_masks(tmp_path):
    # Reads of 4 frames: all three inputs' objects are open at once (with long reads an input can end,
    # and free its actors for the next input's objects, before the last object opens).
    small = dict(max_batch_size=4, max_wait_ms=0, decode_chunk=4, queue_capacity=16)
    packed = InProcessBackend()
    Engine(packed, FAKE, engine_cfg(**small)).run(streams(tmp_path, sub="packed"))
    single = InProcessBackend()
    Engine(single, FAKE, engine_cfg(**small, objects_per_tracker=1)).run(streams(tmp_path, sub="single"))
    assert len(tracker_actors(single)) == 6 and len(tracker_actors(packed)) == 1
    for s in range(3):
        a, b = masks(tmp_path / "packed" / f"s{s}"), masks(tmp_path / "single" / f"s{s}")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_pool_prefers_the_streams_actor_then_the_least_loaded_then_a_new_one():
    spawned = []
    pool: ActorPool[ObjectKey] = ActorPool("tracker", lambda name: spawned.append(name) or name, capacity=2)
    a1 = pool.place(ObjectKey("a", 1), group="a")
    b1 = pool.place(ObjectKey("b", 1), group="b")
    assert a1 == b1 == "tracker-0"  # room left: no new process
    second = pool.place(ObjectKey("a", 2), group="a")
    assert second == "tracker-1"  # full: a new one
    assert pool.place(ObjectKey("b", 2), group="b") == "tracker-1"
    pool.release(ObjectKey("a", 1))
    assert pool.place(ObjectKey("b", 3), group="b") == "tracker-0"  # freed room is reused
    assert spawned == ["tracker-0", "tracker-1"]
    lost = pool.remove_actor(second)
    assert lost == [ObjectKey("a", 2), ObjectKey("b", 2)] and ObjectKey("a", 2) not in pool
    with pytest.raises(ValueError):
        ActorPool("x", str, capacity=0)


class KillOnce(InProcessBackend):
    """Kills the tracker actor right before its n-th run call (it then hosts objects of both streams)."""

    def __init__(self, at_call: int) -> None:
        super().__init__()
        self.at_call, self.count, self.killed = at_call, 0, None

    def call(self, actor, method, *args, num_returns=1):
        if method == "run" and self.killed is None:
            self.count += 1
            if self.count == self.at_call:
                self.killed = sorted(actor.impl.instance.objects)  # what the process hosted when it died
                self.kill(actor)
        return super().call(actor, method, *args, num_returns=num_returns)


def test_killing_a_tracker_that_hosts_two_streams_recovers_every_object(tmp_path):
    config = engine_cfg(max_batch_size=2, max_wait_ms=0, snapshot_every=3, replay_frames=6)
    reference = Engine(InProcessBackend(), FAKE, config).run(streams(tmp_path, n_streams=2, sub="ref"))
    backend = KillOnce(at_call=5)
    report = Engine(backend, FAKE, config).run(streams(tmp_path, n_streams=2, sub="killed"))
    assert {k.stream_id for k in backend.killed} == {"s0", "s1"}, backend.killed
    assert report.tracker_restarts == 1
    assert all(o.ok for o in report.streams.values()) and all(o.ok for o in reference.streams.values())
    recovered = [e for e in report.events if e.kind == "object_recovered" and "resuming" in e.message]
    assert len(recovered) == 4  # every object of both streams, each from its own snapshot
    for s in range(2):
        a, b = masks(tmp_path / "killed" / f"s{s}"), masks(tmp_path / "ref" / f"s{s}")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_real_model_batched_steps_equal_one_by_one(video_paths, tmp_path):
    """SAM 2.1 tiny at 256 px, 2 inputs x 2 objects, 9 frames (past num_maskmem): objects packed on
    one actor step through model.step_many; capacity 1 steps them one by one. Masks are identical."""
    model = ModelSpec("sam2.1_hiera_tiny", None, 256, "cpu")
    objects = {1: {0: point(640, 360)}, 2: {0: Prompt(box=[300, 200, 700, 600])}}

    def run(sub, **kw):
        specs = [StreamSpec(p.stem, functools.partial(open_source, str(p), max_frames=9), objects,
                            JsonlOutputs(str(tmp_path / sub)), bidirectional=False)
                 for p in video_paths[:2]]
        return Engine(InProcessBackend(), model, engine_cfg(max_batch_size=2, max_wait_ms=0, **kw)).run(specs)

    batched = run("batched")
    single = run("single", objects_per_tracker=1)
    assert max(batched.tracker_batch_sizes) >= 2, batched.tracker_batch_sizes  # really batched
    assert set(single.tracker_batch_sizes) == {1}
    for p in video_paths[:2]:
        a, b = masks(tmp_path / "batched" / p.stem), masks(tmp_path / "single" / p.stem)
        assert len(a) == 18 and a.keys() == b.keys()
        differing = {k: int((a[k] != b[k]).sum()) for k in a if not np.array_equal(a[k], b[k])}
        assert not differing, f"{p.stem}: pixels differing per (frame, object): {differing}"


class OpenCounter(InProcessBackend):
    """Tracks how many sources are open on decoders at once."""

    def __init__(self) -> None:
        super().__init__()
        self.open_now = self.peak = 0

    def call(self, actor, method, *args, num_returns=1):
        if actor.name.startswith("decoder") and method in ("open", "close"):
            self.open_now += 1 if method == "open" else -1
            self.peak = max(self.peak, self.open_now)
        return super().call(actor, method, *args, num_returns=num_returns)


def test_an_archive_opens_its_inputs_a_few_at_a_time(tmp_path):
    backend = OpenCounter()
    report = Engine(backend, FAKE, engine_cfg(max_batch_size=4, max_wait_ms=0, max_active_streams=2)).run(
        streams(tmp_path, n_streams=5, n_objects=1, frames=6))
    assert all(o.ok and o.frames_published == 6 for o in report.streams.values())
    assert backend.peak == 2 and backend.open_now == 0
    assert len(tracker_actors(backend)) == 1  # the same tracker process served all five inputs


def test_a_tracker_step_pass_carries_at_most_max_step_batch_objects():
    """Bounded passes bound a tracker process's activation memory, whatever its object count."""
    from masklet.actors import tracker as tk
    from masklet.model.null_model import build_null_model

    spec = ModelSpec("null", None, 64, "cpu", factory="masklet.model.null_model:build_null_model")
    actor = tk.TrackerActor(spec, None, max_step_batch=4)
    keys = [ObjectKey("s", i) for i in range(10)]
    embedding = build_null_model(image_size=64).encode([None])[0]
    ops = [tk.OpenObject(k, (48, 64)) for k in keys]
    ops += [tk.StepObject(k, tk.FORWARD, 0, (0, None), point(10 + i, 20)) for i, k in enumerate(keys)]
    statuses, *_ = actor.run(ops, embedding)
    assert all(s.error is None for s in statuses)
    assert actor.batch_sizes == {4: 2, 2: 1}


def test_a_pool_can_spread_its_first_members_before_packing():
    """Publishers: the first streams get one each (publishing is CPU-bound per stream), later ones share."""
    spawned = []
    pool: ActorPool[str] = ActorPool("publisher", lambda name: spawned.append(name) or name, capacity=4,
                                     spread_first=2)
    pool.warm()
    assert [pool.place(s) for s in ("s0", "s1", "s2", "s3")] == ["publisher-0", "publisher-1", "publisher-0",
                                                                 "publisher-1"]
    assert spawned == ["publisher-0", "publisher-1"]
    pool.release("s0")
    assert pool.place("s4") == "publisher-0"  # room on an existing actor: no third one
    with pytest.raises(ValueError, match="spread_first"):
        ActorPool("x", str, capacity=1, spread_first=0)


def test_a_tracker_call_returns_its_step_results_as_one_pack_and_snapshots_apart():
    """One reference per call carries every step result (Ray's per-reference cost in the driver
    outweighed publishing); snapshots, kept for recovery, come back as values of their own."""
    from masklet.actors import tracker as tk
    from masklet.actors.payloads import ObjectResult, PackedResult
    from masklet.actors.payloads import FrameMeta
    from masklet.actors.publisher import publish_frames_args
    from masklet.model.null_model import build_null_model

    spec = ModelSpec("null", None, 64, "cpu", factory="masklet.model.null_model:build_null_model")
    actor = tk.TrackerActor(spec, None, max_step_batch=4)
    a, b = ObjectKey("s", 1), ObjectKey("s", 2)
    embedding = build_null_model(image_size=64).encode([None])[0]
    ops = [tk.OpenObject(a, (48, 64)), tk.OpenObject(b, (48, 64)), tk.StepObject(a, tk.FORWARD, 0, (0, None), point(10, 20)),
           tk.SnapshotObject(a), tk.StepObject(b, tk.FORWARD, 0, (0, None), point(30, 20)), tk.SnapshotObject(b),
           tk.CloseObject(a)]
    count, where = tk.return_layout(ops)
    assert count == 4 and where == {2: (1, 0), 4: (1, 1), 3: (2, None), 5: (3, None)}
    statuses, pack, snap_a, snap_b = actor.run(ops, embedding)
    assert all(s.error is None for s in statuses) and len(statuses) == len(ops)
    assert [r.object_id for r in pack] == [1, 2] and all(isinstance(r, ObjectResult) for r in pack)
    # The pack and the statuses cross processes as a few plain values, and come back equal.
    import pickle

    import ray.cloudpickle as cloudpickle
    again = pickle.loads(cloudpickle.dumps(pack, protocol=5))
    assert [(r.object_id, r.frame_idx, r.score, r.iou, r.video_size) for r in again] == \
        [(r.object_id, r.frame_idx, r.score, r.iou, r.video_size) for r in pack]
    assert all(np.array_equal(a.low_res_logits, b.low_res_logits) for a, b in zip(again, pack))
    assert pickle.loads(cloudpickle.dumps(statuses)) == statuses
    assert isinstance(snap_a, tk.ObjectSnapshot) and isinstance(snap_b, tk.ObjectSnapshot)
    # A call with neither steps nor snapshots returns its statuses alone.
    assert tk.return_layout([tk.CloseObject(b)]) == (1, {})
    assert actor.run([tk.CloseObject(b)]) == (tk.OpStatus(),)
    # One publish call takes each pack once, however many of its results its frames need; pixels too.
    m0, m1 = FrameMeta("s", 0, 0.0, 64, 48), FrameMeta("s", 1, 0.0, 64, 48)
    m2 = FrameMeta("s", 2, 0.0, 64, 48)
    read = ("rgb2", "rgb3")  # a decoder read's frames come packed too: one argument for all of them
    lone = pack[0]
    frames, values = publish_frames_args([(m0, None, [PackedResult("pack", 1), PackedResult("pack", 0), lone]),
                                          (m1, "rgb1", [PackedResult("pack2", 0), PackedResult("pack", 1)]),
                                          (m2, PackedResult(read, 1), [PackedResult("pack", 0)])])
    assert values[0] == "pack" and values[1] is lone and values[2:] == ["rgb1", "pack2", read]
    assert frames == ((m0, None, ((0, 1), (0, 0), (1, None))), (m1, (2, None), ((3, 0), (0, 1))),
                      (m2, (4, 1), ((0, 0),)))


def test_a_decoder_read_returns_its_frames_as_one_pack_and_the_encoder_picks_from_it():
    """One object per read, not per frame (each object costs the raylet, the decoder and every reader
    work of their own); the encoder takes a read's pack once for all of its frames and returns one
    embedding pack per group (stream)."""
    from masklet.actors.decoder import DecoderActor
    from masklet.actors.encoder import EncoderActor
    from masklet.actors.payloads import ArgLayout, PackedResult

    decoder = DecoderActor(num_threads=None)
    decoder.open("s", fake_opener(num_frames=5, seed=3))
    metas, pack = decoder.read("s", 3)
    assert [j for j, _ in metas] == [0, 1, 2] and len(pack) == 3
    assert all(isinstance(f, np.ndarray) and f.dtype == np.uint8 for f in pack)
    tail_metas, tail = decoder.read("s", 3)
    assert [j for j, _ in tail_metas] == [3, 4] and len(tail) == 2
    assert decoder.read("s", 3) == ((), ())  # the input has ended
    spec = ModelSpec("null", None, 64, "cpu", factory="masklet.model.null_model:build_null_model")
    layout = ArgLayout()
    picks = layout.picks([PackedResult(pack, 2), PackedResult(tail, 0), PackedResult(pack, 0)])
    assert picks == ((0, 2), (1, 0), (0, 0)) and layout.values == [pack, tail]
    # Frames come grouped (one group per stream): each group's embeddings return as one pack.
    statuses, first, second = EncoderActor(spec).encode((picks[:2], picks[2:]), *layout.values)
    assert statuses == (None, None, None) and len(first) == 2 and len(second) == 1


class _PixelProbe:
    """A sink factory that records whether each frame reached its sink with pixels."""

    def __init__(self, needs_pixels):
        if needs_pixels is not None:
            self.needs_pixels = needs_pixels
        self.seen: list[bool] = []

    def __call__(self, info):
        from masklet.actors.sinks import Sink

        seen = self.seen

        class Probe(Sink):
            def _open(self): ...

            def _write(self, frame):
                seen.append(frame.rgb is not None)

            def _close(self): ...

        return [Probe()]


@pytest.mark.parametrize("needs_pixels, expect", [(False, False), (True, True), (None, True)])
def test_frame_pixels_reach_a_publisher_only_when_its_sinks_draw_them(needs_pixels, expect):
    probe = _PixelProbe(needs_pixels)  # None: a factory that does not say gets the pixels
    spec = StreamSpec("s", fake_opener(num_frames=5, seed=0), {1: {0: point(10, 20)}}, probe)
    report = Engine(InProcessBackend(), FAKE, engine_cfg()).run([spec])
    assert report.streams["s"].ok and probe.seen == [expect] * 5


def test_a_batched_pass_gives_its_freed_activations_back(monkeypatch):
    """glibc keeps a batched pass's freed activations resident (68-144 MB at 8 objects of tiny@256,
    bench/objects_bench.py measures the whole run); the tracker trims after a call that batched."""
    from masklet.actors import tracker as tk
    from masklet.model.null_model import build_null_model

    trims = []
    monkeypatch.setattr(tk, "release_free_memory", lambda: trims.append(1))
    spec = ModelSpec("null", None, 64, "cpu", factory="masklet.model.null_model:build_null_model")
    actor = tk.TrackerActor(spec, None, max_step_batch=4)
    keys = [ObjectKey("s", i) for i in range(3)]
    embedding = build_null_model(image_size=64).encode([None])[0]
    actor.run([tk.OpenObject(k, (48, 64)) for k in keys], embedding)
    assert trims == []
    actor.run([tk.StepObject(keys[0], tk.FORWARD, 0, (0, None), point(10, 20))], embedding)  # one object: no batch
    assert trims == []
    actor.run([tk.StepObject(k, tk.FORWARD, 1 if i == 0 else 0, (0, None), point(10 + i, 20) if i else None)
               for i, k in enumerate(keys)], embedding)
    assert trims == [1]


def test_one_encoder_call_batches_streams_and_returns_one_embedding_pack_per_stream():
    """Frames of two streams share one encoder pass; their embeddings come back packed per stream,
    so a pack is freed with its own stream's frames (a slow stream never holds another's)."""
    from masklet.actors.payloads import PackedResult
    from masklet.pipeline import commands as c
    from masklet.pipeline.executor import Executor, ExecutorConfig

    spec = ModelSpec("null", None, 64, "cpu", factory="masklet.model.null_model:build_null_model")
    executor = Executor(InProcessBackend(), spec, ExecutorConfig(max_batch_size=8, max_wait_ms=0))
    frame = np.zeros((48, 64, 3), np.uint8)
    executor.submit([c.Encode(sid, j, frame) for j in range(3) for sid in ("a", "b")])  # interleaved
    done = []
    while len(done) < 6:
        done += [d for d in executor.poll(1.0, flush=True) if isinstance(d, c.Encoded)]
    packs = {sid: {id(d.embedding.ref) for d in done if d.stream_id == sid} for sid in ("a", "b")}
    assert all(isinstance(d.embedding, PackedResult) for d in done)
    assert len(packs["a"]) == 1 and len(packs["b"]) == 1 and packs["a"] != packs["b"], packs
    for d in done:  # each frame's embedding is where its pick says, in frame order within the stream
        assert d.embedding.index == d.frame_idx and len(executor.backend.get(d.embedding.ref)) == 3
    assert executor.report()["encoder_batch_sizes"] == {6: 1}  # still one pass for both streams
    executor.shutdown()
