"""The Ray Serve application itself, on loopback: deploy, authenticate, feed a stream, read a record."""
from __future__ import annotations

import pytest

import os

from tests.serve.conftest import (TOKEN, Client, free_port, is_loopback, listening_sockets_of_descendants,
                                 local_serve, wait_for)


@pytest.fixture()
def ray_serve(monkeypatch):
    # No dashboard (its job API has no auth); only this test's local cluster, on loopback.
    with local_serve(monkeypatch) as port:
        yield port


def test_serve_app_answers_and_listens_on_loopback_only(ray_serve, clip):
    from ray import serve

    from masklet.deploy.serve_deployment import app

    health_port = free_port()
    options = {"checkpoint": "random", "image_size": 256, "device": "cpu", "token": TOKEN, "max_batch_size": 2,
               "health_port": health_port}
    serve.run(app(options), name="masklet", route_prefix="/")
    client, anonymous = Client(f"http://127.0.0.1:{ray_serve}"), Client(f"http://127.0.0.1:{ray_serve}", None)
    assert anonymous.get("/health/live").status_code == 200
    wait_for(lambda: anonymous.get("/health/ready").status_code == 200, timeout=120, interval=0.5,
             message="model loaded in the replica")
    probes = Client(f"http://127.0.0.1:{health_port}", None)  # the replica's own health listener
    assert probes.get("/health/live").json() == {"status": "ok", "ready": True, "detail": ""}
    assert probes.get("/health/ready").status_code == 200
    assert anonymous.get("/streams").status_code == 401
    created = client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "realtime": False})
    assert created.status_code == 201, created.text
    wait_for(lambda: client.get("/streams/cam1/masklet").status_code == 200, timeout=60, message="first record")
    record = client.get("/streams/cam1/masklet").json()
    assert record["schema"] == "masklet/v1" and record["width"] == 96
    assert "masklet_frames_in_total" in client.get("/metrics").text
    assert client.delete("/streams/cam1").status_code == 204
    _every_server_of_the_ray_session_listens_on_loopback_only()


def _every_server_of_the_ray_session_listens_on_loopback_only() -> None:
    """Ray's GCS, raylet, workers and agents, Serve's proxy and the replica's health listener: nothing
    reachable from another machine. Checked in the test above's Serve session (its own cost ~20 s)."""
    sockets = listening_sockets_of_descendants(os.getpid())
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the probe does see Ray's servers
    exposed = [s for s in sockets if not is_loopback(s[0])]
    # The one known exception: Ray Serve 2.60 starts an inter-deployment gRPC server in every replica
    # on a hard-coded "[::]:0" (serve/_private/replica.py, no setting). What reaches it is our ASGI
    # app, whose bearer-token check still applies; README "Status" names it.
    serve_replica_grpc = [s for s in exposed if s[0] == "::" and s[2].startswith("ray::ServeRepli")]
    assert len(serve_replica_grpc) <= 1, exposed
    exposed = [s for s in exposed if s not in serve_replica_grpc]
    assert not exposed, f"listening beyond loopback: {exposed}"

