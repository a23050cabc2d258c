"""The control API over a fake LiveSession: auth, validation, limits, streams, objects, outputs."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from masklet.deploy.api_runtime import SessionSlot
from masklet.deploy.serve_app import create_app
from masklet.pipeline.config import ServeSettings
from tests.serve.conftest import TOKEN, Client, LoopbackServer, wait_for
from tests.serve.fake_session import FakeLiveSession


@pytest.fixture()
def fake():
    return FakeLiveSession()


@pytest.fixture()
def server(fake):
    app = create_app(fake, ServeSettings(max_streams=2, max_body_bytes=4096), token=TOKEN)
    with LoopbackServer(app) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return Client(server.url)


def start_stream(client, clip, stream_id="cam1", **extra):
    body = {"stream_id": stream_id, "source": str(clip), "realtime": False, **extra}
    response = client.post("/streams", json=body)
    assert response.status_code == 201, response.text
    wait_for(lambda: client.get(f"/streams/{stream_id}").json()["frames_in"] > 0, message="first frame")
    return response.json()


def test_every_endpoint_but_health_and_console_needs_the_token(server):
    anonymous, wrong = Client(server.url, token=None), Client(server.url, token="wrong")
    for path in ("/streams", "/streams/x", "/streams/x/frame.png", "/streams/x/frame.jpg", "/streams/x/masklet",
                 "/streams/x/events",
                 "/metrics", "/openapi.json", "/no/such/path"):
        for who in (anonymous, wrong):
            response = who.get(path)
            assert response.status_code == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert anonymous.post("/streams", json={}).status_code == 401
    assert anonymous.get("/health/live").status_code == 200
    assert anonymous.get("/health/ready").json() == {"status": "ok", "ready": True, "detail": ""}
    page = anonymous.get("/")
    assert page.status_code == 200 and "Masklet console" in page.text
    assert anonymous.get("/console/app.js").status_code == 200


def test_openapi_schema_lists_the_resources(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/streams", "/streams/{stream_id}", "/streams/{stream_id}/objects",
                 "/streams/{stream_id}/objects/{object_id}/refine", "/streams/{stream_id}/objects/{object_id}",
                 "/streams/{stream_id}/frame.png", "/streams/{stream_id}/frame.jpg", "/streams/{stream_id}/masklet",
                 "/streams/{stream_id}/events",
                 "/health/live", "/health/ready", "/metrics"):
        assert path in paths, path


def test_invalid_bodies_get_422_with_a_readable_reason(client, clip):
    cases = [
        ({"stream_id": "a b", "source": str(clip)}, "stream_id"),
        ({"stream_id": "a", "source": str(clip), "kafka_stream": "k"}, "exactly one"),
        ({"stream_id": "a", "source": "udp://0.0.0.0:5000"}, "not allowed"),
        ({"stream_id": "a", "source": str(clip), "colour": "red"}, "colour"),
        ({"stream_id": "a", "source": "/no/such/file.mp4"}, "no such file"),
    ]
    for body, expected in cases:
        response = client.post("/streams", json=body)
        assert response.status_code == 422, body
        assert isinstance(response.json()["detail"], str) and expected in response.json()["detail"], response.text
    start_stream(client, clip)
    bad_prompts = [
        ({"points": [[10, 10]], "labels": []}, "1 points need 1 labels"),
        ({"box": [30, 30, 10, 10]}, "x0 < x1"),
        ({}, "needs points, a box or a mask"),
        ({"points": [[1, 1]], "labels": [2]}, "labels must be 1"),
    ]
    for body, expected in bad_prompts:
        response = client.post("/streams/cam1/objects", json=body)
        assert response.status_code == 422 and expected in response.json()["detail"], response.text
    response = client.post("/streams/cam1/objects/1/refine", json={"box": [0, 0, 5, 5]})
    assert response.status_code == 422


def test_bodies_over_the_cap_get_413(client):
    big = json.dumps({"stream_id": "x", "source": "a" * 5000})
    response = client.post("/streams", data=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413

    def chunks():  # no Content-Length: the cap applies while the body arrives
        for _ in range(10):
            yield b" " * 1000

    response = client.post("/streams", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_stream_lifecycle_objects_frame_and_record(client, fake, clip):
    created = start_stream(client, clip, loop=True, realtime=True)  # a camera-like stream that keeps running
    assert created["stream_id"] == "cam1" and created["source"] == str(clip)
    assert [s["stream_id"] for s in client.get("/streams").json()] == ["cam1"]
    assert client.post("/streams", json={"stream_id": "cam1", "source": str(clip)}).status_code == 409
    detail = client.get("/streams/cam1").json()
    assert detail["state"] == "running" and (detail["width"], detail["height"]) == (96, 64)

    added = client.post("/streams/cam1/objects", json={"points": [[30, 30]], "labels": [1], "frame_idx": 3})
    assert added.status_code == 202, added.text
    assert added.json() == {"stream_id": "cam1", "object_id": 1, "frame_idx": 3, "action": "add"}
    boxed = client.post("/streams/cam1/objects", json={"box": [60, 5, 80, 20]})
    latest = client.get("/streams/cam1/masklet").json()["frame_idx"]
    assert boxed.json()["object_id"] == 2 and boxed.json()["frame_idx"] <= latest  # default: latest frame
    refine = client.post("/streams/cam1/objects/1/refine", json={"points": [[30, 30]], "labels": [0]})
    assert refine.status_code == 202
    assert [p.action for p in fake.prompts] == ["add", "add", "refine"]
    assert client.post("/streams/cam1/objects/9/refine", json={"points": [[1, 1]], "labels": [1]}).status_code == 409
    assert client.get("/streams/cam1").json()["objects"] == {"1": 5.0, "2": 5.0}

    # the fake draws masks on frames after the prompt: the next record shows both objects
    # object 1 was added at frame 3, object 2 at the latest frame: wait for a record past both
    def both_objects():
        latest = client.get("/streams/cam1/masklet").json()
        return {o["object_id"] for o in latest["objects"]} == {1, 2} and latest

    record = wait_for(both_objects, message="masks of both objects")
    png = client.get("/streams/cam1/frame.png")
    assert png.headers["content-type"] == "image/png" and int(png.headers["X-Frame-Index"]) >= record["frame_idx"]
    pixels = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    assert pixels.shape == (64, 96, 3) and pixels[10, 70].any()  # object 2's box is coloured
    jpeg = client.get("/streams/cam1/frame.jpg")  # what the console shows: the same picture, lossy
    assert jpeg.headers["content-type"] == "image/jpeg" and int(jpeg.headers["X-Frame-Index"]) >= record["frame_idx"]
    assert jpeg.headers["X-Revision"] == "0" and png.headers["X-Revision"] == "0"
    pixels = np.asarray(Image.open(io.BytesIO(jpeg.content)).convert("RGB"))
    assert pixels.shape == (64, 96, 3) and pixels[10, 70].max() > 100, pixels[10, 70]  # coloured (background: 58)

    assert client.delete("/streams/cam1/objects/2").status_code == 202
    assert client.delete("/streams/cam1").status_code == 204
    assert client.get("/streams/cam1").status_code == 404
    wait_for(lambda: "cam1" not in fake.streams(), message="stream closed")


def test_a_finished_stream_stays_inspectable_and_leaves_the_session(client, fake, clip):
    start_stream(client, clip)
    detail = wait_for(lambda: (d := client.get("/streams/cam1").json())["state"] == "finished" and d,
                      message="clip fed")
    wait_for(lambda: "cam1" not in fake.streams(), message="the finished stream left the session")
    detail = client.get("/streams/cam1").json()
    assert (detail["width"], detail["height"]) == (96, 64) and detail["frames_in"] == 20
    assert detail["frames_published"] == 20  # its final figures, kept after the session let it go
    assert client.get("/streams/cam1/masklet").json()["frame_idx"] == 19
    refused = client.post("/streams/cam1/objects", json={"points": [[30, 30]], "labels": [1]})
    assert refused.status_code == 409 and "finished" in refused.json()["detail"]
    assert client.delete("/streams/cam1").status_code == 204


def test_stream_cap_answers_503_with_retry_after(client, clip):
    start_stream(client, clip, "a", loop=True, realtime=True)
    start_stream(client, clip, "b", loop=True, realtime=True)
    response = client.post("/streams", json={"stream_id": "c", "source": str(clip)})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "stream cap" in response.json()["detail"]


def test_finished_and_failed_streams_leave_the_stream_cap(client, fake, clip, tmp_path):
    """Regression (issue 12): ended streams used to hold their slot until someone deleted them."""
    start_stream(client, clip, "done")  # 20 frames, not paced: finishes at once
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip.read_bytes()[: len(clip.read_bytes()) // 2])  # cut short: the feeder fails
    client.post("/streams", json={"stream_id": "broken", "source": str(broken), "realtime": False})
    for stream_id, state in (("done", "finished"), ("broken", "failed")):
        wait_for(lambda: client.get(f"/streams/{stream_id}").json()["state"] == state, message=f"{stream_id} {state}")
    wait_for(lambda: not fake.streams(), message="ended streams closed in the session")
    for stream_id in ("c", "d"):  # the cap is 2: both slots are free again
        response = client.post("/streams", json={"stream_id": stream_id, "source": str(clip), "loop": True})
        assert response.status_code == 201, response.text
    assert {s["stream_id"]: s["state"] for s in client.get("/streams").json()} == {
        "done": "finished", "broken": "failed", "c": "running", "d": "running"}


def test_session_refusal_marks_the_stream_failed(client, fake, clip):
    fake.max_streams = 0  # the LiveSession refuses the stream when its first frame arrives
    client.post("/streams", json={"stream_id": "a", "source": str(clip), "realtime": False})
    detail = wait_for(lambda: (d := client.get("/streams/a").json())["state"] == "failed" and d, message="failure")
    assert "max_streams" in detail["error"]


def test_events_stream_masklet_records(client, fake, clip):
    start_stream(client, clip, loop=True, realtime=True)
    with client.session.get(client.url + "/streams/cam1/events", stream=True, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines(decode_unicode=True)
        data = next(line for line in lines if line.startswith("data: "))
    record = json.loads(data[len("data: "):])
    assert record["schema"] == "masklet/v1" and record["stream_id"] == "cam1"


def test_metrics_are_prometheus_text_from_the_session(client, clip):
    start_stream(client, clip)
    text = client.get("/metrics").text
    assert "# TYPE masklet_frames_in_total counter" in text
    assert 'masklet_frames_in_total{source_type="file"}' in text


def test_not_ready_while_the_model_loads_and_503_on_the_api():
    slot = SessionSlot()
    app = create_app(slot, ServeSettings(), token=TOKEN)
    with LoopbackServer(app) as srv:
        client = Client(srv.url)
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        assert client.get("/health/live").status_code == 200
        refused = client.post("/streams", json={"stream_id": "a", "source": "/"})
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        fake = FakeLiveSession()
        slot._set(fake)
        assert client.get("/health/ready").status_code == 200 and fake.started


def test_not_ready_when_kafka_is_configured_but_unreachable(fake):
    from masklet.pipeline.config import KafkaSettings
    from tests.serve.conftest import free_port

    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    with LoopbackServer(create_app(fake, ServeSettings(), token=TOKEN, kafka=kafka)) as srv:
        ready = Client(srv.url).get("/health/ready")
        assert ready.status_code == 503 and "kafka unreachable" in ready.json()["detail"]


def test_too_many_requests_in_flight_get_503(fake, clip):
    import threading

    app = create_app(fake, ServeSettings(), token=TOKEN, max_in_flight=1)
    with LoopbackServer(app) as srv:
        client = Client(srv.url)
        start_stream(client, clip)
        entered, release = threading.Event(), threading.Event()
        real_status = fake.status

        def slow_status(stream_id):
            entered.set()
            release.wait(5)
            return real_status(stream_id)

        fake.status = slow_status
        slow = threading.Thread(target=lambda: Client(srv.url).get("/streams/cam1"))
        slow.start()
        assert entered.wait(5)
        busy = client.get("/streams")
        release.set()
        slow.join(10)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
