"""API streams read and decoded in one SourceReader actor (actors/source_reader.py, deploy/feeders.py)."""
from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import ray

from masklet.actors.backend import InProcessBackend, RayBackend
from masklet.actors.payloads import ModelSpec, StoredFrame
from masklet.deploy.feeders import Feeder, ReaderPool, actor_source_frames, source_frames
from masklet.deploy.serve_app import create_app
from masklet.monitoring.stats import Stats
from masklet.pipeline.config import ServeSettings
from masklet.pipeline.live import LiveConfig, LiveSession
from tests.serve.conftest import TOKEN, Client, LoopbackServer, start_local_ray, wait_for

FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")


def local_frames(clip, **kwargs):
    return list(source_frames(str(clip), realtime=False, loop=False, max_frames=None, **kwargs)(threading.Event()))


def clip_reader(clip):
    return functools.partial(source_frames, str(clip), realtime=False, loop=False, max_frames=None)


def assert_same_frames(backend, got, want):
    assert [(f.frame_idx, f.pts, f.fps) for f in got] == [(f.frame_idx, f.pts, f.fps) for f in want]
    for frame, local in zip(got, want):
        assert isinstance(frame.rgb, StoredFrame) and frame.size == local.size == (64, 96)
        np.testing.assert_array_equal(backend.get(frame.rgb.pixels), local.rgb)


def test_the_reader_gives_the_frames_of_the_source_in_process(clip):
    backend = InProcessBackend()
    got = list(actor_source_frames(ReaderPool(backend, 2), "cam1", clip_reader(clip))(threading.Event()))
    assert len(got) == 20
    assert_same_frames(backend, got, local_frames(clip))


def flaky_frames(stats, give_up=False):
    """A source that counts a reconnect, gives three frames, counts two more, then ends or gives up."""
    def frames(stop):
        stats.inc("masklet_reconnects_total", source_type="rtsp")
        for i in range(3):
            yield type("Frame", (), {"frame_idx": i, "pts": i / 10, "rgb": np.full((4, 6, 3), i, np.uint8), "fps": 10.0})()
        stats.inc("masklet_reconnects_total", source_type="rtsp")
        stats.inc("masklet_reconnects_total", source_type="rtsp")
        if give_up:
            raise RuntimeError("rtsp://cam/1: 5 reconnects failed; last error: connection refused\ntraceback...")
    return frames


def test_the_readers_counters_reach_the_callers_stats_also_after_the_last_frame():
    backend, stats = InProcessBackend(), Stats()
    got = list(actor_source_frames(ReaderPool(backend, 2), "cam1", flaky_frames, stats)(threading.Event()))
    assert [f.frame_idx for f in got] == [0, 1, 2] and got[2].size == (4, 6)
    assert stats.snapshot().value("masklet_reconnects_total", source_type="rtsp") == 3


def test_a_source_that_gives_up_ends_the_stream_with_its_reason_and_its_counts():
    backend, stats = InProcessBackend(), Stats()
    failing = actor_source_frames(ReaderPool(backend, 2), "cam2", functools.partial(flaky_frames, give_up=True), stats)
    got = []
    with pytest.raises(RuntimeError) as failure:
        for frame in failing(threading.Event()):
            got.append(frame)
    assert str(failure.value) == "rtsp://cam/1: 5 reconnects failed; last error: connection refused"
    assert len(got) == 3 and stats.snapshot().value("masklet_reconnects_total", source_type="rtsp") == 3


def test_a_refused_stream_stops_its_reader_at_once(clip):
    """The session refuses the stream at its first frame: the reader is stopped and killed then, not
    whenever the generator is collected."""
    backend = InProcessBackend()

    class RefusingSession:
        def open_stream(self, *args, **kwargs):
            raise ValueError("max_streams (0) reached; close a stream first")

    pool = ReaderPool(backend, 2)
    feeder = Feeder(RefusingSession(), "cam1", str(clip), actor_source_frames(pool, "cam1", clip_reader(clip)))
    feeder.start()
    wait_for(lambda: feeder.status.state == "failed", message="the stream refused")
    assert feeder.status.error == "max_streams (0) reached; close a stream first"
    assert [method for _, method in backend.calls] == ["open", "next_frame", "next_frame", "close"]
    assert backend.get(backend.call(pool.get(), "open_sources")) == []


@pytest.fixture(scope="module")
def ray_session():
    monkeypatch = pytest.MonkeyPatch()
    start_local_ray(monkeypatch, num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()
    monkeypatch.undo()


def reader_actors() -> list[str]:
    """Source reader actors alive (a killed actor's name is released)."""
    return [name for name in ray.util.list_named_actors() if "/source-reader-" in name]


def test_on_ray_frames_stay_in_the_store_and_outlive_the_reader(ray_session, clip):
    backend = RayBackend()
    pool = ReaderPool(backend, 2)
    frames = actor_source_frames(pool, "cam1", clip_reader(clip))(threading.Event())
    first = next(frames)
    assert isinstance(first.rgb.pixels, ray.ObjectRef)
    got = [first, *frames]
    pool.shutdown()  # the reader is killed: the caller owns the frames, still readable
    wait_for(lambda: not reader_actors(), timeout=30, message="the reader actor gone")
    assert_same_frames(backend, got, local_frames(clip))


def test_the_api_over_a_ray_session_reads_its_streams_in_one_reader_actor(ray_session, clip):
    session = LiveSession(RayBackend(), FAKE, LiveConfig(queue_capacity=4, max_streams=2))
    try:
        with LoopbackServer(create_app(session, ServeSettings(max_streams=2), token=TOKEN)) as server:
            client = Client(server.url)
            for sid in ("cam1", "cam2"):
                created = client.post("/streams", json={"stream_id": sid, "source": str(clip), "loop": True})
                assert created.status_code == 201, created.text
                wait_for(lambda: client.get(f"/streams/{sid}/masklet").status_code == 200, timeout=60,
                         message=f"first record of {sid}")
            [name] = reader_actors()  # one process for both streams
            reader = ray.get_actor(name)
            assert sorted(ray.get(reader.open_sources.remote())) == ["cam1#0", "cam2#1"]
            assert client.post("/streams/cam1/objects", json={"box": [60, 5, 80, 20]}).status_code == 202
            record = wait_for(lambda: (r := client.get("/streams/cam1/masklet").json())["objects"] and r, timeout=60,
                              message="the object in a record")
            assert record["objects"][0]["rle"]["size"] == [64, 96]
            picture = client.get("/streams/cam1/frame.jpg")  # its pixels come from the store, put by the reader
            assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
            assert client.delete("/streams/cam1").status_code == 204
            wait_for(lambda: ray.get(reader.open_sources.remote()) == ["cam2#1"], timeout=30,
                     message="cam1's source closed in the reader")

            # a reader that dies ends its streams with one readable line; the next stream gets a new one
            ray.kill(reader)
            detail = wait_for(lambda: (d := client.get("/streams/cam2").json())["state"] == "failed" and d, timeout=60,
                              message="cam2 failed")
            assert detail["error"].startswith("source reader died: ") and "\n" not in detail["error"], detail
            assert client.delete("/streams/cam2").status_code == 204
            created = client.post("/streams", json={"stream_id": "cam3", "source": str(clip)})
            assert created.status_code == 201, created.text
            wait_for(lambda: client.get("/streams/cam3/masklet").status_code == 200, timeout=60, message="cam3 fed")
            assert len(reader_actors()) == 1 and reader_actors() != [name]
    finally:
        session.shutdown()
