"""Every lost frame is reported (issue 12.5): reordering healed by frame index, losses named.

The end-to-end test restarts the embedded (memory-only) broker while `masklet ingest` streams and
`masklet run` consumes: frames the broker had acknowledged are gone, resent ones may arrive
behind newer ones. It reconciles frames sent = published + dropped + lost, every lost frame named.
The unit tests pin down `FrameReorder`'s rules.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from masklet.actors.sources import DecodedFrame
from masklet.pipeline.kafka.client import producer_kwargs
from masklet.pipeline.kafka.ingest import ingest
from masklet.pipeline.kafka.producer import RecoveringProducer
from masklet.pipeline.kafka.reorder import FrameReorder, Refused, Release
from tests.kafka.test_kafka_run import FAKE, Background, publish_frames

FRAMES = 150


@contextmanager
def synthetic_clip(uri, *, max_pixels, max_frames):
    source = type("Clip", (), {"fps": 30.0})()

    def frames():
        for idx in range(FRAMES):
            rgb = np.full((48, 64, 3), 60, np.uint8)
            rgb[10:30, 20:44] = (200, 40, 40)
            yield DecodedFrame(idx, idx / 30.0, rgb, (64, 48))

    source.frames = frames
    yield source


def test_a_broker_restart_mid_stream_loses_no_frame_silently(broker, kafka_settings):
    settings = kafka_settings.model_copy(update={"live": kafka_settings.live.model_copy(
        update={"reorder_window_ms": 2000})})
    records, lock = [], threading.Lock()

    def collect(out):
        with lock:
            records.append(out.record)

    def published_of(stream_id: str) -> int:
        with lock:
            return sum(1 for r in records if r.stream_id == stream_id)

    def wait_for(stream_id: str, count: int) -> None:
        deadline = time.monotonic() + 90  # the first group join on Tansu takes seconds
        while published_of(stream_id) < count:
            assert time.monotonic() < deadline, f"{published_of(stream_id)} of {count} {stream_id} records"
            time.sleep(0.02)

    bg = Background(settings, FAKE, on_output=collect)
    try:
        publish_frames(settings, "warm-up", [np.zeros((48, 64, 3), np.uint8)], 0, 1)
        wait_for("warm-up", 1)  # the runner is in its group and consuming
        result: dict = {}
        producer = RecoveringProducer(producer_kwargs(settings), recovery_backoff_s=0.2)
        worker = threading.Thread(target=lambda: result.update(report=ingest(
            "clip.mp4", "cam", settings, realtime=True, open_fn=synthetic_clip, producer=producer)), daemon=True)
        worker.start()
        wait_for("cam", 20)  # mid-stream: the runner knows the stream and its step
        # A consumer that lags: frames acknowledged meanwhile are still unread when the broker restarts.
        reading, poll = threading.Event(), bg.runner.consumer.poll
        bg.runner.consumer.poll = lambda *args, **kw: reading.wait(30) and poll(*args, **kw)
        time.sleep(1.0)  # ~30 frames acknowledged, not read
        broker.restart()  # memory-only: acknowledged frames not yet consumed are gone
        reading.set()
        worker.join(timeout=120)
        assert not worker.is_alive(), "ingest hung after the broker restart"
        producer.close()
        assert result["report"].frames_sent == FRAMES

        def accounted() -> tuple[set, int, int]:
            with lock:
                firsts = [r for r in records if r.revision == 0 and r.stream_id == "cam"]
            published = {r.frame_idx for r in firsts}
            return (published, sum(r.dropped_frames_since_last for r in firsts),
                    sum(r.lost_frames_since_last for r in firsts))

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            published, dropped, lost = accounted()
            if FRAMES - 1 in published and len(published) + dropped + lost >= FRAMES:
                break
            time.sleep(0.1)
        runner = bg.runner
    finally:
        bg.close()
    published, dropped, lost = accounted()
    named = {i for first, last in runner.report.lost.get("cam", []) for i in range(first, last + 1)}
    summary = (f"published {len(published)}, dropped {dropped}, lost {lost} (named {sorted(named)}), "
               f"delivery: {result['report'].delivery.summary()}; run: {runner.report.summary()}")
    assert len(published) + dropped + lost == FRAMES, summary
    assert lost == len(named) == runner.report.lost_frames, summary
    assert not named & published, summary
    assert len(set(range(FRAMES)) - published - named) == dropped, summary  # the rest were reported dropped
    snap = runner.stats_snapshot()
    assert snap.total("masklet_frames_lost_total") == lost, summary
    assert lost <= result["report"].delivery.acked_then_lost_by_broker, summary  # no more than the broker lost
    print(summary)


# -- FrameReorder's rules ---------------------------------------------------------------------


@dataclass(frozen=True)
class F:
    frame_idx: int
    stream_id: str = "s"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def indices(outcomes) -> list:
    return [(o.frame.frame_idx, o.lost_before) if isinstance(o, Release) else (o.frame.frame_idx, o.kind)
            for o in outcomes]


def test_reordered_frames_go_on_in_index_order_within_the_window():
    clock = Clock()
    reorder = FrameReorder(window_s=2.0, window_frames=100, clock=clock)
    assert indices(sum((reorder.offer(F(i)) for i in range(5)), [])) == [(i, 0) for i in range(5)]
    assert reorder.offer(F(7)) == [] and reorder.offer(F(6)) == []  # 5 is missing: held
    clock.t = 1.5
    assert indices(reorder.offer(F(5))) == [(5, 0), (6, 0), (7, 0)]  # it came within the window
    assert indices(reorder.offer(F(6))) == [(6, "duplicate")]


def test_a_gap_past_the_window_is_declared_lost_and_a_late_frame_is_not_counted_twice():
    clock = Clock()
    reorder = FrameReorder(window_s=2.0, window_frames=100, clock=clock)
    for i in range(5):
        reorder.offer(F(i))
    assert reorder.offer(F(9)) == []
    clock.t = 2.5
    released = reorder.expire()
    assert indices(released) == [(9, 4)] and released[0].lost == (5, 6, 7, 8) and released[0].lost_ranges == ((5, 8),)
    assert indices(reorder.offer(F(6))) == [(6, "late")]
    assert indices(reorder.offer(F(10))) == [(10, 0)]


def test_the_frame_window_bounds_what_is_held_and_irregular_streams_are_never_held():
    reorder = FrameReorder(window_s=60.0, window_frames=3, clock=Clock())
    for i in range(0, 50, 10):  # step 10, regular
        reorder.offer(F(i, "sparse"))
    assert reorder.offer(F(50, "sparse")) == [Release(F(50, "sparse"))]
    assert reorder.offer(F(80, "sparse")) == [] and reorder.offer(F(90, "sparse")) == []
    out = reorder.offer(F(100, "sparse"))  # a third frame held: the gap (60, 70) is lost
    assert indices(out) == [(80, 2), (90, 0), (100, 0)] and out[0].lost == (60, 70)
    for i in (0, 3, 4, 9, 15):  # irregular steps: never held
        assert indices(reorder.offer(F(i, "odd"))) == [(i, 0)]
    assert isinstance(reorder.offer(F(2, "odd"))[0], Refused)
