"""Engine logic in-process, with a fake model and synthetic sources: no Ray, no real model."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from masklet.actors.payloads import ModelSpec, StreamInfo
from masklet.model.types import Prompt
from masklet.actors.backend import ActorDiedError, InProcessBackend
from masklet.pipeline.batching import BoundedQueue, DynamicBatcher, OverflowPolicy, QueueFull
from masklet.pipeline.engine import Engine, EngineConfig, StreamSpec
from masklet.actors.rle import decode_rle
from tests.pipeline.configs import engine_cfg as cfg
from tests.pipeline.fakes import FakeModel, FakeSource, fake_opener, synthetic_frames

FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")


class ListSink:
    """Keeps records in memory (a class attribute, so tests can read what the publisher wrote)."""

    written: dict[str, list] = {}

    def __init__(self, stream_id: str, fail_at: int | None = None) -> None:
        self.stream_id, self.fail_at, self.name = stream_id, fail_at, f"list:{stream_id}"

    def open(self):
        ListSink.written[self.stream_id] = []

    def write(self, frame):
        if self.fail_at is not None and frame.record.frame_idx >= self.fail_at:
            return "disk full"
        ListSink.written[self.stream_id].append(frame.record)

    def close(self):
        return None


@dataclass(frozen=True)
class ListSinks:
    fail_at: int | None = None

    def __call__(self, info: StreamInfo):
        return [ListSink(info.stream_id, self.fail_at)]


def point(x, y):
    return Prompt(points=[[x, y]], labels=[1])


def stream(sid, n=10, objects=None, fail_at=None, sink_fail_at=None, **kw):
    objects = {1: {0: point(10, 20)}} if objects is None else objects
    return StreamSpec(sid, fake_opener(num_frames=n, fail_at=fail_at, name=f"{sid}.mp4", **kw), objects,
                      ListSinks(sink_fail_at))


def run(streams, config=None, backend=None):
    config = config or cfg(max_batch_size=4, max_wait_ms=0)
    engine = Engine(backend or InProcessBackend(), FAKE, config)
    return engine.run(streams), engine


def masks_of(sid):
    return {r.frame_idx: {o.object_id: decode_rle(o.rle.model_dump()) for o in r.objects} for r in ListSink.written[sid]}


def direct_masks(n, prompts, bidirectional=True, **kw):
    """The same fake model driven by hand: the reference every pipeline run must equal."""
    frames = synthetic_frames(n, **kw)
    model = FakeModel(64)
    emb = model.encode(np.stack(frames))
    out = {j: {} for j in range(n)}
    for oid, by_frame in prompts.items():
        k = min(by_frame)
        t = model.new_tracker(frames[0].shape[:2])
        for j in range(k, n):
            out[j][oid] = t.step(j, emb[j], by_frame.get(j)).mask.numpy()
        if bidirectional and k > 0:
            rt = t.reverse_tracker()
            for j in range(k - 1, -1, -1):
                out[j][oid] = rt.step(j, emb[j]).mask.numpy()
    return out


def assert_same(actual, expected):
    assert sorted(actual) == sorted(expected)
    for j in expected:
        assert sorted(actual[j]) == sorted(expected[j]), j
        for oid in expected[j]:
            assert np.array_equal(actual[j][oid], expected[j][oid]), (j, oid)


def test_one_record_per_frame_in_order_and_equal_to_model():
    report, _ = run([stream("a", 10)])
    assert report.streams["a"].ok and report.streams["a"].frames_published == 10
    assert [r.frame_idx for r in ListSink.written["a"]] == list(range(10))
    assert_same(masks_of("a"), direct_masks(10, {1: {0: point(10, 20)}}))


def test_backward_propagation_covers_frames_before_first_prompt():
    prompts = {1: {4: point(20, 20)}, 2: {0: point(40, 10)}}
    report, _ = run([stream("b", 9, prompts)], cfg(max_batch_size=3, max_wait_ms=0, backward_delay=2))
    assert report.streams["b"].frames_published == 9
    assert_same(masks_of("b"), direct_masks(9, prompts))


def test_batching_across_streams_changes_nothing():
    together, _ = run([stream("x", 8, seed=1), stream("y", 8, seed=2)], cfg(max_batch_size=8, max_wait_ms=0))
    both = masks_of("x"), masks_of("y")
    assert max(together.batch_sizes) > 4, together.batch_sizes  # frames of both streams in one pass
    run([stream("x", 8, seed=1)])
    run([stream("y", 8, seed=2)])
    assert_same(both[0], masks_of("x"))
    assert_same(both[1], masks_of("y"))


def test_wait_policy_never_drops_even_with_tiny_queues():
    config = cfg(max_batch_size=2, max_wait_ms=0, queue_capacity=2, replay_frames=3, snapshot_every=2,
                          decode_chunk=1)
    report, _ = run([stream("w", 25)], config)
    assert report.streams["w"].frames_published == 25
    assert report.stats.total("masklet_frames_dropped_total") == 0
    assert report.stats.total("masklet_frames_in_total") == 25
    assert report.stats.total("masklet_frames_published_total") == 25


def test_stream_without_objects_skips_the_encoder():
    report, _ = run([stream("empty", 5, objects={})])
    assert report.streams["empty"].frames_published == 5
    assert all(r.objects == [] for r in ListSink.written["empty"])
    assert sum(report.batch_sizes.values()) == 0


def test_sink_failure_is_an_event_not_a_crash():
    report, _ = run([stream("s", 6, sink_fail_at=3), stream("t", 6)])
    assert report.streams["s"].frames_published == 6  # the stream itself went on
    assert any(e.kind == "sink_error" and "disk full" in e.message for e in report.events)
    assert not report.streams["s"].ok and report.streams["t"].ok


def test_bad_input_fails_alone_with_one_line():
    report, _ = run([stream("bad", 10, fail_at=4), stream("good", 6)])
    assert report.streams["bad"].error == "bad.mp4: truncated: decoding failed after 4 frames"
    assert report.streams["good"].ok and report.streams["good"].frames_published == 6


@pytest.mark.parametrize("prompt, message", [
    ({1: {0: point(500, 10)}}, "outside the 64x48 frame"),
    ({1: {30: point(5, 5)}}, "prompted on frame 30, but the input has 10 frames"),
])
def test_bad_prompts_fail_the_stream(prompt, message):
    report, _ = run([stream("p", 10, prompt)])
    assert message in report.streams["p"].error


class DyingBackend(InProcessBackend):
    """Kills a named actor right before its n-th call of `method`."""

    def __init__(self, name_part: str, method: str, at_call: int) -> None:
        super().__init__()
        self.name_part, self.method, self.at_call, self.count = name_part, method, at_call, 0

    def call(self, actor, method, *args, num_returns=1):
        if self.name_part in actor.name and method == self.method:
            self.count += 1
            if self.count == self.at_call:
                self.kill(actor)
        return super().call(actor, method, *args, num_returns=num_returns)


@pytest.mark.parametrize("name_part, method, at_call", [("tracker", "run", 4), ("tracker", "run", 2),
                                                        ("encoder", "encode", 2)])
def test_actor_death_is_recovered_without_gaps(name_part, method, at_call):
    prompts = {1: {3: point(20, 20)}}
    config = cfg(max_batch_size=2, max_wait_ms=0, snapshot_every=3, replay_frames=6, backward_delay=1)
    report, engine = run([stream("r", 12, prompts)], config, DyingBackend(name_part, method, at_call))
    assert report.streams["r"].ok, report.streams["r"].error
    assert [r.frame_idx for r in ListSink.written["r"]] == list(range(12))
    assert report.tracker_restarts + report.encoder_restarts == 1
    assert_same(masks_of("r"), direct_masks(12, prompts))


def test_bounded_queue_policies():
    q = BoundedQueue(2, OverflowPolicy.DROP_OLDEST)
    for i in range(5):
        q.put(i)
    assert list(q) == [3, 4] and q.dropped["queue_full"] == 3
    w = BoundedQueue(1, OverflowPolicy.WAIT)
    w.put(1)
    with pytest.raises(QueueFull):
        w.put(2)


def test_batcher_releases_when_full_or_timed_out():
    b = DynamicBatcher(max_batch_size=3, max_wait_ms=10)
    b.add("a", 0.0)
    assert b.next_batch(0.005) is None
    assert b.next_batch(0.011) == ["a"]
    for x in "bcde":
        b.add(x, 1.0)
    assert b.next_batch(1.0) == ["b", "c", "d"]
    assert b.next_batch(1.0, flush=True) == ["e"]


@pytest.mark.parametrize("overrides, field", [({"max_batch_size": 0}, "max_batch_size"),
                                              ({"max_wait_ms": -1}, "max_wait_ms"),
                                              ({"snapshot_every": 10, "replay_frames": 5}, "snapshot_every")])
def test_engine_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        cfg(**overrides)


def test_frames_in_flight_are_bounded_in_bytes_too():
    """queue_bytes caps a stream's decoded pixels: a read's frames are one object, freed with its last
    frame, so frames in flight plus a read's tail fit the budget. 720p keeps the frame count, 4K gets
    a few frames, never fewer than two in flight (reading overlaps encoding)."""
    from masklet.pipeline.file_stream import FileStream

    def capacity(width, height, budget=128 << 20, read_chunk=16):
        stream = FileStream("s", {}, queue_capacity=32, queue_bytes=budget, read_chunk=read_chunk)
        stream.set_video_size(width, height)
        held = stream.queue_capacity + min(read_chunk, stream.queue_capacity) - 1  # the worst case
        assert held * 3 * width * height <= max(budget, 3 * 3 * width * height), (width, height, held)
        return stream.queue_capacity, stream.room()

    assert capacity(1280, 720) == (32, 32)
    assert capacity(1920, 1080) == (11, 11)
    assert capacity(3840, 2160) == (3, 3)
    assert capacity(7680, 4320, budget=1 << 20) == (2, 2)
    assert capacity(1920, 1080, read_chunk=1) == (21, 21)  # one frame per read: frames alone fill it
    for side in range(64, 4096, 97):  # every size keeps the bound
        capacity(side, side * 9 // 16 or 1)
    unbounded = FileStream("s", {}, queue_capacity=32)
    unbounded.set_video_size(3840, 2160)
    assert unbounded.queue_capacity == 32
