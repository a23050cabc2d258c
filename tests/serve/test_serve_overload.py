"""Issue 12, item 3, through Ray Serve itself: the request limits come from deploy/serve_config.yaml
(CLI and YAML alike), SSE feeds beyond their cap get 503 at once, and open feeds never block
/health/live or other routes (five open feeds used to freeze the whole API: Serve's default of 5
concurrent requests per replica, with an unbounded queue); bodies over the cap get 413 there too."""
from __future__ import annotations

import statistics
import time

import pytest
import requests
import yaml

from tests.serve.conftest import TOKEN, Client, free_port, local_serve, wait_for


@pytest.fixture()
def ray_serve(monkeypatch):
    """A new local Ray session on loopback, Serve on a free port. address="local": never join a cluster
    that some other process started with `ray start` on this machine."""
    with local_serve(monkeypatch) as port:
        yield port


@pytest.fixture(params=["proxy", "direct"])
def api_port(request, monkeypatch):
    """Serve with the API port answered by its proxy, or by the replica itself (direct ingress, as
    `masklet serve` runs by default: deploy/serve_ingress.py). Ray's switches are set in the
    environment the new Ray session inherits, and restored afterwards."""
    from masklet.deploy.serve_ingress import direct_ingress_env

    if request.param == "proxy":
        with local_serve(monkeypatch) as port:
            yield port
        return
    port = free_port()  # the replica's own port, read from the environment when Ray starts
    for key, value in direct_ingress_env(port).items():
        monkeypatch.setenv(key, value)
    with local_serve(monkeypatch):
        yield port


def _serve_config() -> dict:
    from masklet.deploy.api_limits import SERVE_CONFIG

    return yaml.safe_load(SERVE_CONFIG.read_text())


def test_the_cli_builds_the_app_with_the_request_limits_of_serve_config_yaml():
    """`masklet serve` runs `serve.run(app(options))`: that deployment must carry the YAML's limits,
    not Serve's defaults (5 ongoing, unbounded queue)."""
    import argparse

    from masklet.deploy.serve_deployment import app
    from masklet.deploy.serve_cli import serve_options

    [api] = [d for d in _serve_config()["applications"][0]["deployments"] if d["name"] == "MaskletAPI"]
    args = argparse.Namespace(model="sam2.1_hiera_tiny", checkpoint="random", image_size=256, device="cpu",
                              kafka=False, config=None, max_streams=None)
    built = app(serve_options(args, TOKEN))._bound_deployment._deployment_config
    assert (built.max_ongoing_requests, built.max_queued_requests) == (api["max_ongoing_requests"],
                                                                       api["max_queued_requests"])
    assert built.max_ongoing_requests > 5 and built.max_queued_requests >= 0


def test_the_in_app_cap_leaves_room_for_event_streams_and_health():
    from masklet.deploy.api_limits import HEALTH_REQUEST_RESERVE, deployment_limits, in_flight_cap
    from masklet.pipeline.config import LimitsSettings

    limits = LimitsSettings()
    ongoing = deployment_limits()["max_ongoing_requests"]
    assert in_flight_cap(ongoing, limits) == limits.max_in_flight_requests
    # a burst far larger than what the app works on still reaches the app, which answers it
    assert ongoing >= 4 * (limits.max_in_flight_requests + limits.max_event_streams + HEALTH_REQUEST_RESERVE)
    with pytest.raises(ValueError, match="must be at least"):
        in_flight_cap(30, limits)


def _get(url: str, path: str, token: str | None = TOKEN) -> tuple[int, float, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.monotonic()
    response = requests.get(url + path, headers=headers, timeout=20)
    return response.status_code, time.monotonic() - started, response.headers.get("Retry-After", "")


def test_open_event_streams_never_block_the_api_and_big_bodies_get_413_on_ray_serve(api_port, clip):
    from ray import serve

    from masklet.deploy.serve_deployment import app
    from masklet.pipeline.config import LimitsSettings

    options = {"checkpoint": "random", "image_size": 256, "device": "cpu", "token": TOKEN, "max_batch_size": 2}
    serve.run(app(options), name="masklet", route_prefix="/")
    url = f"http://127.0.0.1:{api_port}"
    client = Client(url)
    wait_for(lambda: client.get("/health/ready").status_code == 200, timeout=120, interval=0.5,
             message="model loaded in the replica")
    created = client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "loop": True})
    assert created.status_code == 201, created.text

    cap = LimitsSettings().max_event_streams
    feeds = []
    try:
        for _ in range(cap):  # more than Serve's default of 5 concurrent requests per replica
            response = requests.get(url + "/streams/cam1/events", headers={"Authorization": f"Bearer {TOKEN}"},
                                    stream=True, timeout=20)
            assert response.status_code == 200, response.text
            lines = response.iter_lines()  # kept: a discarded line iterator closes the connection
            next(lines)
            feeds.append((response, lines))
        over = [_get(url, "/streams/cam1/events") for _ in range(3)]
        health = [_get(url, "/health/live", token=None) for _ in range(20)]
        others = [_get(url, path) for path in ("/streams", "/streams/cam1", "/metrics")]
    finally:
        for response, _ in feeds:
            response.close()
    health_s = sorted(t for _, t, _ in health)
    print(f"Serve, {cap} open feeds: feed over the cap {[(c, round(t * 1000, 1)) for c, t, _ in over]} ms; "
          f"/health/live p50 {statistics.median(health_s) * 1000:.1f} ms max {health_s[-1] * 1000:.1f} ms; "
          f"other routes {[(c, round(t * 1000, 1)) for c, t, _ in others]} ms")
    assert [(code, retry) for code, _, retry in over] == [(503, "1")] * 3
    assert statistics.median(t for _, t, _ in over) < 0.5  # answered, not queued (the proxy hop included)
    assert {code for code, _, _ in health} == {200} and statistics.median(health_s) < 0.1
    assert [code for code, _, _ in others] == [200, 200, 200]
    _bodies_over_the_cap_get_413(url)


def _probe(url: str, path: str) -> tuple[int, float]:
    started = time.monotonic()
    try:
        code = requests.get(url + path, timeout=60).status_code
    except requests.RequestException as exc:
        code = type(exc).__name__
    return code, time.monotonic() - started


def test_the_health_listener_answers_while_a_flood_queues_in_serves_proxy(ray_serve, clip):
    """Serve's proxy serves requests first come, first served, so under a flood every route of the API
    port waits in its queue, /health/live too. The replica's health listener (serve.health_port) has
    its own socket and thread: its probes must not wait behind the flood. The flood runs as another
    process; the proxy's /health/live is probed in the same window as the listener, alternately."""
    import subprocess
    import sys
    from pathlib import Path

    from ray import serve

    from masklet.deploy.serve_deployment import app

    health_port = free_port()
    options = {"checkpoint": "random", "image_size": 256, "device": "cpu", "token": TOKEN, "max_batch_size": 2,
               "health_port": health_port}
    serve.run(app(options), name="masklet", route_prefix="/")
    url, health_url = f"http://127.0.0.1:{ray_serve}", f"http://127.0.0.1:{health_port}"
    wait_for(lambda: _probe(health_url, "/health/ready")[0] == 200, timeout=120, interval=0.5,
             message="model loaded (health listener's readiness)")
    assert _probe(health_url, "/health/live")[0] == 200 and _probe(health_url, "/nope")[0] == 404
    flooder = subprocess.Popen([sys.executable, str(Path(__file__).with_name("flood_client.py")), str(ray_serve),
                                "/health/live", TOKEN, "1000", "200"], stdout=subprocess.PIPE, text=True)
    listener, proxy = [], []
    try:
        wait_for(lambda: _probe(url, "/health/live")[1] > 0.2, timeout=60, interval=0.01,
                 message="the flood to queue requests in the proxy")
        while flooder.poll() is None and len(proxy) < 40:
            listener.append(_probe(health_url, "/health/live"))
            proxy.append(_probe(url, "/health/live"))
        out, _ = flooder.communicate(timeout=300)
    finally:
        flooder.kill()
    in_flood = [(lc, lt, pc, pt) for (lc, lt), (pc, pt) in zip(listener, proxy)]
    listener_s, proxy_s = sorted(t for _, t, _, _ in in_flood), sorted(t for _, _, _, t in in_flood)
    print(f"flood {out.strip()}\nprobes in the flood: {len(in_flood)}; health listener p50 "
          f"{statistics.median(listener_s) * 1000:.1f} ms max {listener_s[-1] * 1000:.1f} ms; via the proxy p50 "
          f"{statistics.median(proxy_s) * 1000:.1f} ms max {proxy_s[-1] * 1000:.1f} ms")
    assert len(in_flood) >= 3, "too few probes overlapped the flood to compare"
    assert {c for c, _, _, _ in in_flood} == {200}, in_flood
    # the listener does not queue behind the flood: an order of magnitude apart, robust to a loaded machine
    assert statistics.median(listener_s) * 10 < statistics.median(proxy_s), in_flood


def _bodies_over_the_cap_get_413(url: str) -> None:
    """Through Ray Serve, whichever ingress: a body over serve.max_body_bytes is refused with 413, both
    when its Content-Length says so (before it is read) and when it arrives chunked (cut off at the
    cap). Under direct ingress the API's guard stands in front of Serve's request handling too (the
    front gate, deploy/serve_ingress.py), so the chunked cut happens inside Serve's receive path.
    Checked in the event-stream test's Serve session: a Ray session and replica of its own cost ~25 s."""
    from masklet.pipeline.config import ServeSettings

    cap = ServeSettings().max_body_bytes
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    declared = requests.post(url + "/streams", data=b" " * (cap + 1), headers=headers, timeout=60)

    def chunks():  # no Content-Length
        for _ in range(cap // (1 << 20) + 2):
            yield b" " * (1 << 20)

    chunked = requests.post(url + "/streams", data=chunks(), headers=headers, timeout=60)
    after = requests.get(url + "/streams", headers=headers, timeout=30)
    print(f"declared: {declared.status_code} {declared.text[:200]}; chunked: {chunked.status_code} {chunked.text[:200]}")
    assert declared.status_code == 413 and "byte limit" in declared.json()["detail"], declared.text
    assert chunked.status_code == 413 and "byte limit" in chunked.json()["detail"], chunked.text
    assert after.status_code == 200  # the API goes on
