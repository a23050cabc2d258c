"""Issue 12, item 3, where Ray Serve's proxy answers the API port (`masklet serve --ingress proxy`, a
RayService): the API's guard stands in the proxy too (deploy/serve_ingress.py, `proxy_gate_env`), so
past the caps the proxy itself answers 503 + Retry-After instead of queueing the request for the
replica. Its token and caps come from the proxy's environment; body sizes stay with the app."""
from __future__ import annotations

import asyncio

import pytest
import requests

from tests.serve.conftest import TOKEN, Client, local_serve, wait_for


def _proxy_middlewares(monkeypatch, env: dict[str, str]) -> list:
    """What Ray's own code puts in front of a proxy whose environment is `env` (no API replica here)."""
    from ray.serve._private import http_util
    from ray.serve.config import HTTPOptions

    from masklet.deploy import serve_ingress

    for key in ("MASKLET_API_TOKEN", "MASKLET_CONFIG", "MASKLET_SERVE__PROXY_GATE", "MASKLET_LIMITS__MAX_IN_FLIGHT_REQUESTS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(http_util, "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", serve_ingress.FRONT_GATE_IMPORT_PATH)
    monkeypatch.setattr(serve_ingress, "_front_gate_config", None)
    return http_util.configure_http_middlewares(HTTPOptions()).middlewares


def test_the_proxy_gate_takes_its_token_and_caps_from_the_environment(monkeypatch, tmp_path):
    from masklet.deploy.serve_ingress import proxy_gate_env

    config = tmp_path / "masklet.yaml"
    config.write_text("limits:\n  max_in_flight_requests: 3\n  max_event_streams: 2\n")
    [gate] = _proxy_middlewares(monkeypatch, proxy_gate_env("secret-token", str(config)))
    assert gate.kwargs["token"] == "secret-token"
    limits = gate.kwargs["limits"]
    assert (limits.max_in_flight, limits.max_event_streams, limits.max_body_bytes) == (3, 2, None)
    assert "/health/live" in gate.kwargs["public_paths"] and "/-/healthz" in gate.kwargs["public_paths"]

    # MASKLET_* variables as anywhere else; off by setting, without a token, or with a config it cannot read
    env = {**proxy_gate_env("secret-token"), "MASKLET_LIMITS__MAX_IN_FLIGHT_REQUESTS": "7"}
    assert _proxy_middlewares(monkeypatch, env)[0].kwargs["limits"].max_in_flight == 7
    assert _proxy_middlewares(monkeypatch, {**env, "MASKLET_SERVE__PROXY_GATE": "false"}) == []
    env.pop("MASKLET_API_TOKEN")
    assert _proxy_middlewares(monkeypatch, env) == []
    config.write_text("limits:\n  max_in_flight_requests: -3\n")
    assert _proxy_middlewares(monkeypatch, proxy_gate_env("secret-token", str(config))) == []


def test_the_proxy_gate_leaves_body_sizes_to_the_app(monkeypatch):
    """The app's body cap changes live (`reconfigure`, max_request_bytes); a copy in the proxy would
    not follow it, so the proxy's guard never answers 413."""
    from masklet.deploy.serve_ingress import proxy_gate_env
    from starlette.middleware import Middleware

    [gate] = _proxy_middlewares(monkeypatch, proxy_gate_env("tok"))
    assert isinstance(gate, Middleware)
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = gate.cls(app, *gate.args, **gate.kwargs)
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/streams", "headers": [
        (b"authorization", b"Bearer tok"), (b"content-length", str(10**12).encode())]}
    asyncio.run(guard(scope, receive, send))
    assert reached == ["/streams"] and sent[0]["status"] == 200


@pytest.fixture()
def gated_proxy(monkeypatch):
    """Serve's proxy started with the gate's environment, capping SSE feeds at 2 (the app's own cap is
    set far higher below, so a refusal at 3 can only come from the proxy)."""
    from masklet.deploy.serve_ingress import proxy_gate_env

    for key, value in {**proxy_gate_env(TOKEN), "MASKLET_LIMITS__MAX_EVENT_STREAMS": "2"}.items():
        monkeypatch.setenv(key, value)  # inherited by the Ray session's processes; restored afterwards
    with local_serve(monkeypatch) as port:
        yield port


def test_serves_proxy_answers_past_the_caps_itself(gated_proxy, clip):
    from ray import serve

    from masklet.deploy.serve_deployment import app

    options = {"checkpoint": "random", "image_size": 256, "device": "cpu", "token": TOKEN, "max_batch_size": 2,
               "limits": {"max_event_streams": 32}}
    serve.run(app(options), name="masklet", route_prefix="/")
    url = f"http://127.0.0.1:{gated_proxy}"
    client = Client(url)
    wait_for(lambda: client.get("/health/ready").status_code == 200, timeout=120, interval=0.5,
             message="model loaded in the replica")
    assert client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "loop": True}).status_code == 201
    assert requests.get(url + "/streams", timeout=30).status_code == 401  # no token: refused (the proxy or the app)
    assert requests.get(url + "/-/healthz", timeout=30).status_code == 200  # Serve's own route stays token-free
    headers = {"Authorization": f"Bearer {TOKEN}"}
    feeds = []
    try:
        for _ in range(2):
            response = requests.get(url + "/streams/cam1/events", headers=headers, stream=True, timeout=20)
            assert response.status_code == 200, response.text
            lines = response.iter_lines()  # kept: a discarded line iterator closes the connection
            next(lines)
            feeds.append((response, lines))
        with requests.get(url + "/streams/cam1/events", headers=headers, stream=True, timeout=20) as over:
            body = over.raw.read(300, decode_content=True).decode(errors="replace")  # a feed never ends
            print("third feed through the gated proxy:", over.status_code, dict(over.headers), body)
            assert over.status_code == 503 and over.headers.get("Retry-After") == "1", (over.status_code, body)
            assert "too many event streams open (2)" in body  # the proxy's count: the app allows 32
        assert client.get("/streams").status_code == 200  # other routes keep their own cap
        assert requests.get(url + "/health/live", timeout=20).status_code == 200
    finally:
        for response, _ in feeds:
            response.close()
    # closed feeds leave the proxy's count
    wait_for(lambda: _opens(url, headers), timeout=30, interval=0.2, message="a feed slot freed in the proxy")


def _opens(url: str, headers: dict) -> bool:
    with requests.get(url + "/streams/cam1/events", headers=headers, stream=True, timeout=20) as response:
        return response.status_code == 200
