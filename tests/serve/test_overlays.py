"""frame.png and frame.jpg are encoded once per published output, stream and format (deploy/overlays.py)."""
from __future__ import annotations

import gc
import io
import threading
from types import SimpleNamespace

import pytest
from PIL import Image

from masklet.deploy import overlays
from masklet.deploy.overlays import OverlayCache
from masklet.deploy.serve_app import create_app
from masklet.pipeline.config import ServeSettings
from tests.serve.conftest import TOKEN, Client, LoopbackServer, wait_for
from tests.serve.fake_session import FakeLiveSession


class Stream:  # stands in for a Feeder: hashable by identity, weakly referenceable
    pass


def output(frame_idx: int, revision: int = 0) -> SimpleNamespace:
    return SimpleNamespace(record=SimpleNamespace(frame_idx=frame_idx, revision=revision))


class CountingRender:
    def __init__(self, delay: threading.Event | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.delay = delay

    def __call__(self, out, fmt: str) -> bytes:
        if self.delay is not None:
            self.delay.wait(10)
        self.calls.append((out.record.frame_idx, out.record.revision))
        return f"{fmt} {out.record.frame_idx}.{out.record.revision}".encode()


def test_an_output_is_encoded_once_and_a_newer_one_or_a_revision_again():
    render = CountingRender()
    cache, cam = OverlayCache("png", render), Stream()
    first = output(5)
    assert [cache.picture(cam, first) for _ in range(3)] == [b"png 5.0"] * 3
    assert render.calls == [(5, 0)]
    revised = output(5, revision=1)  # a revision of the same frame is a new picture
    assert cache.picture(cam, revised) == b"png 5.1" and cache.picture(cam, revised) == b"png 5.1"
    later = output(6)
    assert cache.picture(cam, later) == b"png 6.0" and cache.picture(cam, later) == b"png 6.0"
    assert render.calls == [(5, 0), (5, 1), (6, 0)] and cache.renders == 3


def test_streams_are_kept_apart_and_an_older_output_does_not_evict_the_newest():
    render = CountingRender()
    cache, a, b = OverlayCache("png", render), Stream(), Stream()
    newest, older = output(9), output(8)
    assert cache.picture(a, newest) == b"png 9.0" and cache.picture(b, older) == b"png 8.0"
    assert cache.picture(a, older) == b"png 8.0"  # a request that still held frame 8 of stream a
    assert cache.picture(a, newest) == b"png 9.0" and cache.picture(b, older) == b"png 8.0"
    assert render.calls == [(9, 0), (8, 0), (8, 0)], render.calls  # frame 9 of a stayed cached


def test_concurrent_requests_for_one_output_share_one_encoding():
    release = threading.Event()
    render = CountingRender(delay=release)
    cache, cam, out = OverlayCache("png", render), Stream(), output(3)
    answers: list[bytes] = []
    threads = [threading.Thread(target=lambda: answers.append(cache.picture(cam, out))) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(t.is_alive() for t in threads) == 8, message="all requests waiting")
    release.set()
    for thread in threads:
        thread.join(10)
    assert answers == [b"png 3.0"] * 8 and render.calls == [(3, 0)]


def test_a_dropped_stream_takes_its_picture_with_it():
    cache, cam = OverlayCache("png", CountingRender()), Stream()
    cache.picture(cam, output(1))
    assert len(cache._latest) == 1
    del cam
    gc.collect()
    assert len(cache._latest) == 0 and len(cache._encoding) == 0


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown overlay format 'gif'"):
        OverlayCache("gif")


@pytest.fixture()
def counted_renders(monkeypatch):
    calls = []
    real = overlays.overlay_image

    def counting(out, fmt):
        calls.append((fmt, out.record.frame_idx))
        return real(out, fmt)

    monkeypatch.setattr(overlays, "overlay_image", counting)
    return calls


def test_the_api_serves_a_finished_streams_picture_from_one_encoding(counted_renders, clip):
    fake = FakeLiveSession()
    with LoopbackServer(create_app(fake, ServeSettings(), token=TOKEN)) as server:
        client = Client(server.url)
        created = client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "realtime": False})
        assert created.status_code == 201, created.text
        wait_for(lambda: client.get("/streams/cam1").json()["state"] == "finished", message="clip fed")
        wait_for(lambda: "cam1" not in fake.streams(), message="the finished stream left the session")
        pictures = {fmt: [client.get(f"/streams/cam1/frame.{fmt}") for _ in range(4)] for fmt in ("jpg", "png")}
        for fmt, answers in pictures.items():
            assert {a.status_code for a in answers} == {200} and {a.headers["X-Frame-Index"] for a in answers} == {"19"}
            assert len({a.content for a in answers}) == 1, fmt
            assert Image.open(io.BytesIO(answers[0].content)).size == (96, 64), fmt
        assert counted_renders == [("jpeg", 19), ("png", 19)], counted_renders

        # a poller that has the picture gets 304 and no body; another tag, or none, gets the picture
        etag = pictures["jpg"][0].headers["ETag"]
        assert pictures["png"][0].headers["ETag"] == etag and pictures["jpg"][0].headers["Cache-Control"] == "private, no-cache"
        unchanged = client.get("/streams/cam1/frame.jpg", headers={"If-None-Match": f'"x", W/{etag}'})
        assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["ETag"] == etag
        assert unchanged.headers["X-Frame-Index"] == "19" and unchanged.headers["X-Revision"] == "0"
        assert client.get("/streams/cam1/frame.jpg", headers={"If-None-Match": '"x"'}).status_code == 200
        assert len(counted_renders) == 2  # still one encoding per format

        # the same id created again is another stream: its pictures get other tags
        assert client.delete("/streams/cam1").status_code == 204
        recreated = wait_for(lambda: (r := client.post("/streams", json={"stream_id": "cam1", "source": str(clip),
                                                                       "realtime": False})).status_code == 201 and r,
                             message="cam1 created again")
        assert recreated.status_code == 201
        wait_for(lambda: client.get("/streams/cam1").json()["state"] == "finished", message="clip fed again")
        again = client.get("/streams/cam1/frame.jpg", headers={"If-None-Match": etag})
        assert again.status_code == 200 and again.headers["ETag"] != etag


def test_an_encoded_picture_and_a_304_need_no_worker_thread(monkeypatch, clip):
    """frame.jpg/png answer on the event loop once their picture exists: with the app's one worker
    thread held by an encoding, they still answer (a sync route would wait for the thread). Both
    kinds of worker threads are cut to one: the app's pool and anyio's (FastAPI's sync routes)."""
    import anyio.to_thread

    from masklet.deploy import serve_app

    release, started = threading.Event(), threading.Event()
    real = overlays.overlay_image

    def slow_png(out, fmt):
        if fmt == "png":
            started.set()
            release.wait(60)
        return real(out, fmt)

    monkeypatch.setattr(overlays, "overlay_image", slow_png)
    real_threads = serve_app.ApiThreads
    monkeypatch.setattr(serve_app, "ApiThreads", lambda max_workers: real_threads(1))
    app = create_app(FakeLiveSession(), ServeSettings(), token=TOKEN)

    async def one_worker_thread(scope, receive, send):
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
        await app(scope, receive, send)

    with LoopbackServer(one_worker_thread) as server:
        client = Client(server.url)
        assert client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "realtime": False}).status_code == 201
        wait_for(lambda: client.get("/streams/cam1").json()["state"] == "finished", message="clip fed")
        first = client.get("/streams/cam1/frame.jpg")
        assert first.status_code == 200
        stuck: list = []
        png = threading.Thread(target=lambda: stuck.append(client.get("/streams/cam1/frame.png", timeout=60)))
        png.start()
        try:
            assert started.wait(30), "the png encoding did not start"
            again = Client(server.url).get("/streams/cam1/frame.jpg", timeout=10)
            assert again.status_code == 200 and again.content == first.content
            tagged = Client(server.url).get("/streams/cam1/frame.jpg", headers={"If-None-Match": first.headers["ETag"]},
                                            timeout=10)
            assert tagged.status_code == 304
            assert not stuck, "the png answered before its encoding was released"
        finally:
            release.set()
            png.join(60)
        assert stuck and stuck[0].status_code == 200 and stuck[0].headers["content-type"] == "image/png"


@pytest.mark.parametrize("kept", [True, False])
def test_pixels_are_fetched_off_the_event_loop_and_a_record_without_pixels_gets_204(kept, clip, monkeypatch):
    """`rgb` may be a ray.get from the object store: it runs in one of the app's threads, never on
    the loop; a record whose pixels were not kept has no picture (204 + Retry-After)."""
    from tests.serve import fake_session

    fetched_in: list[str] = []
    real_output = fake_session.LiveOutput

    def output_with(record, tokens, fetch_rgb=None):
        def fetch():
            fetched_in.append(threading.current_thread().name)
            return fetch_rgb()

        return real_output(record, tokens, fetch_rgb=fetch if kept else None)

    monkeypatch.setattr(fake_session, "LiveOutput", output_with)
    with LoopbackServer(create_app(FakeLiveSession(), ServeSettings(), token=TOKEN)) as server:
        client = Client(server.url)
        assert client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "realtime": False}).status_code == 201
        wait_for(lambda: client.get("/streams/cam1").json()["state"] == "finished", message="clip fed")
        answer = client.get("/streams/cam1/frame.jpg")
        if kept:
            assert answer.status_code == 200 and answer.headers["X-Frame-Index"] == "19"
            assert fetched_in and all(name.startswith("masklet-api") for name in fetched_in), fetched_in
        else:
            assert answer.status_code == 204 and answer.headers["Retry-After"] == "1" and not fetched_in
