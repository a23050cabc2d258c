"""The API over the real LiveSession (random weights, 256 px, in-process): objects, records, events."""
from __future__ import annotations

import json

import pytest

from masklet.deploy.serve_app import create_app
from masklet.pipeline.config import ServeSettings
from tests.serve.conftest import TOKEN, Client, LoopbackServer, wait_for
from tests.serve.live_fixtures import real_live_session


@pytest.fixture()
def live_client(clip):
    session = real_live_session()
    try:
        with LoopbackServer(create_app(session, ServeSettings(), token=TOKEN)) as server:
            client = Client(server.url)
            created = client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "loop": True})
            assert created.status_code == 201, created.text
            wait_for(lambda: client.get("/streams/cam1/masklet").status_code == 200, timeout=60,
                     message="first record")
            yield client
    finally:
        session.shutdown()


def test_add_refine_remove_with_the_real_session(live_client):
    client = live_client
    added = client.post("/streams/cam1/objects", json={"points": [[30, 30]], "labels": [1]})
    assert added.status_code == 202, added.text
    record = wait_for(lambda: (r := client.get("/streams/cam1/masklet").json())["objects"] and r, timeout=60,
                      message="object in a record")
    [obj] = record["objects"]
    assert obj["object_id"] == 1 and obj["rle"]["size"] == [64, 96]
    status = client.get("/streams/cam1").json()
    assert status["objects"].keys() == {"1"} and status["frames_published"] > 0 and status["fps"] >= 0

    # issue 12: bodies that gave HTTP 500 (non-ASCII RLE counts) or a 6 GB decode (a 65-byte mask
    # declaring 50000x50000) over the real session: one-line 422s, the session untouched
    for mask, reason in (({"size": [64, 96], "counts": "\u00ff\u00fe"}, "invalid_prompt"),
                         ({"size": [50000, 50000], "counts": ""}, "out_of_range")):
        refused = client.post("/streams/cam1/objects", json={"mask": mask})
        assert refused.status_code == 422 and refused.json()["detail"].startswith(reason), refused.text

    boxed = client.post("/streams/cam1/objects", json={"box": [5, 5, 40, 40]})
    assert boxed.status_code == 202 and boxed.json()["object_id"] == 2
    too_old = client.post("/streams/cam1/objects/1/refine", json={"points": [[31, 31]], "labels": [0], "frame_idx": 0})
    assert too_old.status_code in (202, 409)  # frame 0 may already be older than the object's latest step
    if too_old.status_code == 409:
        assert too_old.json()["detail"].split(":")[0] in ("not_latest_frame", "frame_too_old")
    assert client.delete("/streams/cam1/objects/7").status_code == 409  # unknown object

    with client.session.get(client.url + "/streams/cam1/events", stream=True, timeout=30) as response:
        data = next(line for line in response.iter_lines(decode_unicode=True) if line.startswith("data: "))
    event = json.loads(data[len("data: "):])
    assert event["stream_id"] == "cam1" and {o["object_id"] for o in event["objects"]} <= {1, 2}

    assert client.delete("/streams/cam1/objects/1").status_code == 202
    wait_for(lambda: "1" not in client.get("/streams/cam1").json()["objects"], timeout=30, message="object 1 gone")
    text = client.get("/metrics").text
    assert "masklet_frames_published_total" in text and "masklet_encoder_batch_size_bucket" in text
    assert client.delete("/streams/cam1").status_code == 204


def test_a_late_prompt_revises_published_records_on_the_api(live_client):
    """An object added at a frame already published: that frame (and the published ones after it in
    the ring) come again on the SSE feed with revision 1, and the masklet endpoint keeps showing the
    newest frame, never an older one's revision."""
    client = live_client
    newest = wait_for(lambda: (r := client.get("/streams/cam1/masklet").json())["frame_idx"] >= 6 and r,
                      timeout=60, message="six frames published")
    target = newest["frame_idx"] - 3
    with client.session.get(client.url + "/streams/cam1/events", stream=True, timeout=60) as response:
        added = client.post("/streams/cam1/objects", json={"points": [[30, 30]], "labels": [1], "frame_idx": target})
        assert added.status_code == 202, added.text
        revised = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                record = json.loads(line[len("data: "):])
                if record["frame_idx"] == target:
                    revised = record
                    break
    assert revised is not None and revised["revision"] == 1, revised
    assert [o["object_id"] for o in revised["objects"]] == [1]
    latest = client.get("/streams/cam1/masklet").json()
    assert latest["frame_idx"] >= newest["frame_idx"] > target, (latest["frame_idx"], newest["frame_idx"])
