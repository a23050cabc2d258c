"""The health listener (deploy/health_listener.py): its answers, the stall rule, and the CLI's port check."""
from __future__ import annotations

import argparse
import socket
import time

import pytest
import requests

from masklet.deploy.health_listener import Heartbeat, HealthListener, start_health_listener


@pytest.fixture()
def listener():
    state = {"value": ("loading", None)}
    heartbeat = Heartbeat()
    server = HealthListener("127.0.0.1", 0, heartbeat, lambda: state["value"], stall_s=0.5).start()
    try:
        yield server, heartbeat, state
    finally:
        server.close()


def test_live_ready_and_unknown_paths(listener):
    server, heartbeat, state = listener
    live = requests.get(server.url + "/health/live", timeout=10)
    assert live.status_code == 200 and live.json() == {"status": "ok", "ready": False, "detail": None}
    ready = requests.get(server.url + "/health/ready", timeout=10)
    assert ready.status_code == 503 and ready.headers["Retry-After"] == "5", ready.text
    assert ready.json()["status"] == "loading"
    state["value"] = ("ready", None)
    assert requests.get(server.url + "/health/ready", timeout=10).json() == {"status": "ok", "ready": True,
                                                                            "detail": None}
    state["value"] = ("failed", "RuntimeError: no weights")
    failed = requests.get(server.url + "/health/ready", timeout=10)
    assert failed.status_code == 503 and failed.json()["detail"] == "RuntimeError: no weights"
    assert requests.get(server.url + "/streams", timeout=10).status_code == 404
    assert requests.get(server.url + "/health/live?verbose=1", timeout=10).status_code == 200


def test_live_turns_503_once_the_api_event_loop_stops_beating(listener):
    server, heartbeat, _ = listener
    heartbeat.beat()
    assert requests.get(server.url + "/health/live", timeout=10).status_code == 200
    heartbeat.last = time.monotonic() - 5.0  # silent for 5 s, stall_s 0.5
    stalled = requests.get(server.url + "/health/live", timeout=10)
    assert stalled.status_code == 503 and "has not run for 5 s" in stalled.json()["detail"], stalled.text
    heartbeat.beat()
    assert requests.get(server.url + "/health/live", timeout=10).status_code == 200


def test_the_app_event_loop_beats_while_the_app_runs():
    from masklet.deploy.api_runtime import SessionSlot
    from masklet.deploy.serve_app import create_app
    from tests.serve.conftest import LoopbackServer, wait_for

    heartbeat = Heartbeat()
    app = create_app(SessionSlot(), token="t" * 24, max_in_flight=4, heartbeat=heartbeat)  # model "loading"
    assert heartbeat.last is None
    with LoopbackServer(app):  # runs the lifespan, as Serve does
        wait_for(lambda: heartbeat.last is not None, timeout=30, message="a first beat")
        first = heartbeat.last
        wait_for(lambda: heartbeat.last != first, timeout=30, message="a second beat")


def test_a_taken_port_logs_and_returns_none(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert start_health_listener("127.0.0.1", port, Heartbeat(), lambda: ("ready", None)) is None
    assert "not started" in caplog.text
    assert start_health_listener("127.0.0.1", None, Heartbeat(), lambda: ("ready", None)) is None


def test_masklet_serve_refuses_a_taken_health_port_before_starting_ray(capsys):
    from masklet.deploy.serve_cli import run_serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = argparse.Namespace(host="127.0.0.1", port=8000, health_port=port, model=None, checkpoint="random",
                                  image_size=256, device="cpu", precision=None, model_factory=None, kafka=False,
                                  config=None, max_streams=None)
        assert run_serve(args) == 2
    err = capsys.readouterr().err
    assert f"health port 127.0.0.1:{port} is not free" in err and "--health-port" in err, err


def test_serve_options_place_the_health_listener_beside_the_api():
    from masklet.deploy.serve_cli import serve_options
    from masklet.pipeline.config import load_settings

    args = argparse.Namespace(model=None, checkpoint="random", image_size=256, device="cpu", precision=None,
                              model_factory=None, kafka=False, config=None, max_streams=None)
    settings = load_settings(None, serve={"host": "127.0.0.1", "port": 8000, "health_port": 18001})
    options = serve_options(args, "t" * 24, settings)
    assert (options["health_host"], options["health_port"]) == ("127.0.0.1", 18001)
