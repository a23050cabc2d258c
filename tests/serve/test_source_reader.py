"""API streams read and decoded in a SourceReader actor (actors/source_reader.py, deploy/feeders.py)."""
from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import ray

from masklet.actors.backend import InProcessBackend, RayBackend
from masklet.actors.payloads import ModelSpec, StoredFrame
from masklet.deploy.feeders import actor_source_frames, source_frames
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
    got = list(actor_source_frames(backend, "cam1", clip_reader(clip))(threading.Event()))
    assert len(got) == 20
    assert_same_frames(backend, got, local_frames(clip))


def flaky_frames(stats, fail_after=None):
    """A source that counts two reconnects, gives three frames, then ends or fails."""
    def frames(stop):
        stats.inc("masklet_reconnects_total", source_type="rtsp")
        stats.inc("masklet_reconnects_total", source_type="rtsp")
        for i in range(3):
            if fail_after == i:
                raise RuntimeError("rtsp://cam/1: 5 reconnects failed; last error: connection refused")
            yield type("Frame", (), {"frame_idx": i, "pts": i / 10, "rgb": np.full((4, 6, 3), i, np.uint8), "fps": 10.0})()
    return frames


def test_the_readers_counters_reach_the_callers_stats_and_a_failure_keeps_its_reason():
    backend, stats = InProcessBackend(), Stats()
    got = list(actor_source_frames(backend, "cam1", flaky_frames, stats)(threading.Event()))
    assert [f.frame_idx for f in got] == [0, 1, 2] and got[2].size == (4, 6)
    assert stats.snapshot().value("masklet_reconnects_total", source_type="rtsp") == 2
    failing = actor_source_frames(backend, "cam2", functools.partial(flaky_frames, fail_after=1))
    with pytest.raises(RuntimeError) as failure:
        list(failing(threading.Event()))
    assert str(failure.value) == "rtsp://cam/1: 5 reconnects failed; last error: connection refused"


@pytest.fixture(scope="module")
def ray_session():
    monkeypatch = pytest.MonkeyPatch()
    start_local_ray(monkeypatch, num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()
    monkeypatch.undo()


def reader_actors() -> list[str]:
    """Source reader actors alive (a killed actor's name is released)."""
    return [name for name in ray.util.list_named_actors() if "/source-" in name]


def test_on_ray_frames_stay_in_the_store_and_outlive_their_reader(ray_session, clip):
    backend = RayBackend()
    stop = threading.Event()
    frames = actor_source_frames(backend, "cam1", clip_reader(clip))(stop)
    first = next(frames)
    assert isinstance(first.rgb.pixels, ray.ObjectRef)
    assert len(reader_actors()) == 1
    got = [first, *frames]  # to the end of the clip: the reader is killed then
    wait_for(lambda: not reader_actors(), timeout=30, message="the reader actor gone")
    assert_same_frames(backend, got, local_frames(clip))  # the caller owns them: still readable


def test_the_api_over_a_ray_session_reads_streams_in_reader_actors(ray_session, clip):
    session = LiveSession(RayBackend(), FAKE, LiveConfig(queue_capacity=4, max_streams=2))
    try:
        with LoopbackServer(create_app(session, ServeSettings(), token=TOKEN)) as server:
            client = Client(server.url)
            created = client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "loop": True})
            assert created.status_code == 201, created.text
            wait_for(lambda: client.get("/streams/cam1/masklet").status_code == 200, timeout=60, message="first record")
            assert len(reader_actors()) == 1
            assert client.post("/streams/cam1/objects", json={"box": [60, 5, 80, 20]}).status_code == 202
            record = wait_for(lambda: (r := client.get("/streams/cam1/masklet").json())["objects"] and r, timeout=60,
                              message="the object in a record")
            assert record["objects"][0]["rle"]["size"] == [64, 96]
            picture = client.get("/streams/cam1/frame.jpg")  # its pixels come from the store, put by the reader
            assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
            assert client.delete("/streams/cam1").status_code == 204
            wait_for(lambda: not reader_actors(), timeout=30, message="the reader actor gone with its stream")
    finally:
        session.shutdown()
