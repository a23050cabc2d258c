"""Counters reconcile after a run (issue 5, Metrics): frames in == frames published + frames dropped.

In-process, with the fake model: the file engine over two short streams, and a live session whose
DROP_OLDEST queues overflow. (The Kafka runner's version, dead letters included, is in
tests/kafka/test_kafka_lag.py.)
"""
from __future__ import annotations

from masklet.actors.payloads import ModelSpec, StreamInfo
from masklet.model.types import Prompt
from masklet.monitoring.stats import frames_reconcile, frames_unaccounted
from masklet.actors.backend import InProcessBackend
from masklet.pipeline.engine import Engine, StreamSpec
from masklet.pipeline.live import LiveConfig, LiveSession
from tests.pipeline.fakes import fake_opener, synthetic_frames
from tests.pipeline.configs import engine_cfg, live_cfg

FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")
H, W = 48, 64


class _Sink:
    """Keeps the records it is given (in-process backend: the instance lives in this process)."""

    def __init__(self, out: list) -> None:
        self.out, self.name = out, "memory"

    def open(self):
        return None

    def write(self, frame):
        self.out.append(frame.record)

    def close(self):
        return None


def test_engine_run_reconciles_over_two_streams():
    written: dict[str, list] = {"objects": [], "empty": []}

    def sinks(info: StreamInfo):
        return [_Sink(written[info.stream_id])]

    specs = [
        StreamSpec("objects", fake_opener(num_frames=7, name="objects.mp4", seed=1),
                   {1: {0: Prompt(points=[[10, 20]], labels=[1])}}, sinks),
        StreamSpec("empty", fake_opener(num_frames=5, name="empty.mp4", seed=2), {}, sinks),
    ]
    report = Engine(InProcessBackend(), FAKE, engine_cfg(max_batch_size=4, max_wait_ms=0)).run(specs)

    assert all(outcome.ok for outcome in report.streams.values()), report.streams
    assert [r.frame_idx for r in written["objects"]] == list(range(7))
    assert [r.frame_idx for r in written["empty"]] == list(range(5))
    assert any(r.objects for r in written["objects"]) and all(not r.objects for r in written["empty"])
    stats = report.stats
    assert stats.total("masklet_frames_in_total") == 12
    assert stats.total("masklet_frames_published_total") == 12
    assert stats.total("masklet_frames_dropped_total") == 0
    assert frames_unaccounted(stats) == 0 and frames_reconcile(stats)


def test_live_session_with_drop_oldest_drops_reconciles():
    frames = synthetic_frames(30, H, W)
    ses = LiveSession(InProcessBackend(), FAKE, live_cfg(queue_capacity=2, max_in_flight=1, max_wait_ms=0))
    outputs = []
    try:
        for sid in ("a", "b"):
            ses.open_stream(sid, W, H)
        for i, rgb in enumerate(frames):  # five frames per stream for each non-blocking poll: drops
            for sid in ("a", "b"):
                ses.submit_frame(sid, i, i / 25, rgb, token=(sid, i))
            if i % 5 == 4:
                outputs += ses.poll(0.0)
        for _ in range(200):  # drain: bounded, stops once every frame is accounted for
            outputs += ses.poll(0.02)
            if frames_reconcile(ses.stats_snapshot()):
                break
        snap = ses.stats_snapshot()
    finally:
        ses.shutdown()

    dropped = snap.value("masklet_frames_dropped_total", reason="queue_full")
    assert dropped > 0
    assert snap.value("masklet_frames_in_total", source_type="live") == 60
    assert snap.total("masklet_frames_published_total") == len(outputs)
    assert snap.total("masklet_frames_dropped_total") == dropped  # nothing else dropped
    assert frames_unaccounted(snap) == 0 and frames_reconcile(snap)
    # The records agree with the counters: their drop reports add up, every token is settled once,
    # and each stream's last frame (nothing newer arrived to push it out) was published.
    assert sum(o.record.dropped_frames_since_last for o in outputs) == dropped
    tokens = [t for o in outputs for t in o.tokens]
    assert sorted(tokens) == sorted((sid, i) for sid in ("a", "b") for i in range(30))
    for sid in ("a", "b"):
        mine = [o.record.frame_idx for o in outputs if o.record.stream_id == sid]
        assert mine == sorted(mine) and mine[-1] == 29
