"""The health listener (deploy/health_listener.py): its answers, the stall rule, and the CLI's port check."""
from __future__ import annotations

import argparse
import os
import socket
import time

import pytest
import requests

from masklet.deploy.health_listener import HealthListener, HealthService, Heartbeat


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
    assert live.status_code == 200 and live.json() == {"status": "ok", "ready": False, "detail": ""}
    ready = requests.get(server.url + "/health/ready", timeout=10)
    assert ready.status_code == 503 and ready.headers["Retry-After"] == "5", ready.text
    assert ready.json()["status"] == "loading"
    state["value"] = ("ready", None)
    assert requests.get(server.url + "/health/ready", timeout=10).json() == {"status": "ok", "ready": True,
                                                                            "detail": ""}
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


def test_a_taken_port_is_retried_until_the_replica_it_replaces_lets_go(caplog):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    service = HealthService("127.0.0.1", port, Heartbeat(), lambda: ("ready", None), retry_s=60)
    try:
        assert service.listener is None and "retrying" in caplog.text
        taken.close()  # the old replica has drained
        deadline = time.monotonic() + 30
        while service.listener is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.listener is not None
        assert requests.get(f"http://127.0.0.1:{port}/health/live", timeout=10).status_code == 200
    finally:
        service.close()
        taken.close()


def test_a_port_still_taken_after_the_retries_leaves_the_listener_off(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        service = HealthService("127.0.0.1", taken.getsockname()[1], Heartbeat(), lambda: ("ready", None), retry_s=0)
        assert service.listener is None and "not started" in caplog.text
        service.close()


@pytest.mark.parametrize("port", [None, -1, 70000])
def test_off_or_impossible_ports_start_nothing_and_raise_nothing(port):
    service = HealthService("127.0.0.1", port, Heartbeat(), lambda: ("ready", None))
    assert service.listener is None
    service.close()


def test_an_ipv6_loopback_host_is_served():
    service = HealthService("::1", 0, Heartbeat(), lambda: ("ready", None), retry_s=0)
    try:
        assert service.listener is not None, "no IPv6 loopback here?"
        assert requests.get(f"http://[::1]:{service.listener.port}/health/ready", timeout=10).status_code == 200
    finally:
        service.close()


def test_health_port_must_differ_from_the_api_port():
    from masklet.pipeline.config import ConfigError, load_settings

    with pytest.raises((ConfigError, ValueError), match="must differ from serve.port"):
        load_settings(None, serve={"port": 8001})


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
    args.health_port = 0
    assert run_serve(args) == 2 and "--health-port 0" in capsys.readouterr().err


def test_serve_options_place_the_health_listener_beside_the_api():
    from masklet.deploy.serve_cli import serve_options
    from masklet.pipeline.config import load_settings

    args = argparse.Namespace(model=None, checkpoint="random", image_size=256, device="cpu", precision=None,
                              model_factory=None, kafka=False, config=None, max_streams=None)
    settings = load_settings(None, serve={"host": "127.0.0.1", "port": 8000, "health_port": 18001})
    options = serve_options(args, "t" * 24, settings)
    assert (options["health_host"], options["health_port"]) == ("127.0.0.1", 18001)


def test_readiness_with_kafka_is_the_same_on_the_listener_and_the_api():
    """With Kafka configured, both /health/ready answers come from one shared KafkaProbe: 503 with the
    probe's reason while no broker accepts connections, 200 once one does."""
    from masklet.deploy.api_runtime import KafkaProbe, SessionSlot
    from masklet.deploy.serve_app import create_app
    from masklet.pipeline.config import KafkaSettings
    from tests.serve.conftest import LoopbackServer, free_port
    from tests.serve.fake_session import FakeLiveSession

    broker_port = free_port()
    probe = KafkaProbe(KafkaSettings(bootstrap_servers=f"127.0.0.1:{broker_port}"), cache_s=0.0)
    slot = SessionSlot(FakeLiveSession())
    heartbeat = Heartbeat()
    app = create_app(slot, token="t" * 24, max_in_flight=4, heartbeat=heartbeat,
                     kafka=probe.settings, kafka_probe=probe)
    listener = HealthListener("127.0.0.1", 0, heartbeat, lambda: (slot.state, slot.error), probe=probe).start()
    try:
        with LoopbackServer(app) as api:
            answers = [requests.get(url + "/health/ready", timeout=10) for url in (listener.url, api.url)]
            assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
            assert answers[0].json() == answers[1].json(), [a.json() for a in answers]
            assert "kafka unreachable" in answers[0].json()["detail"] and answers[0].headers["Retry-After"] == "5"
            with socket.socket() as broker:  # something now accepts connections on the broker's port
                broker.bind(("127.0.0.1", broker_port))
                broker.listen(8)
                answers = [requests.get(url + "/health/ready", timeout=10) for url in (listener.url, api.url)]
                assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
                assert answers[0].json() == answers[1].json() == {"status": "ok", "ready": True, "detail": ""}
    finally:
        listener.close()


def test_direct_ingress_is_switched_on_before_ray_starts_unless_joining_a_session(monkeypatch):
    """serve.ingress: direct sets Ray Serve's switches in the environment the Ray session will inherit,
    pins the replica's port range to the API port and moves the proxy to another free port; joining
    a running session (RAY_ADDRESS) cannot change its switches, so the proxy serves the API port."""
    from masklet.deploy import serve_ingress
    from masklet.pipeline.config import load_settings

    env = serve_ingress.direct_ingress_env(18000)
    for key in (*env, *serve_ingress.proxy_gate_env("t", "c"), "MASKLET_SERVE__PROXY_GATE", "RAY_ADDRESS"):
        # setenv first: monkeypatch then restores the value from before the test (a delenv of an unset
        # variable records nothing, and a later delenv would record what `prepare` set: both leaked
        # direct ingress into every later Ray session of the test process)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    assert load_settings(None).serve.ingress == "direct"
    ingress, proxy_port = serve_ingress.prepare("direct", "127.0.0.1", 18000)
    assert ingress == "direct" and proxy_port != 18000
    assert {key: os.environ[key] for key in env} == env
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("18000",
                                                                                                            "18001")
    assert os.environ["MASKLET_SERVE__PROXY_GATE"] == "false"  # no token given: no gate in the proxy
    for key in env:
        monkeypatch.delenv(key)
    monkeypatch.delenv("MASKLET_SERVE__PROXY_GATE")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert serve_ingress.prepare("direct", "127.0.0.1", 18000) == ("proxy", 18000)
    assert not any(key in os.environ for key in env)
    assert serve_ingress.prepare("proxy", "127.0.0.1", 18000, token="t") == ("proxy", 18000)
    assert "MASKLET_SERVE__PROXY_GATE" not in os.environ and "MASKLET_API_TOKEN" not in os.environ  # a session joined
    # RAY_ADDRESS=local asks for a new session (ours); a `ray start` cluster recorded on this machine
    # would be joined by ray.init() like RAY_ADDRESS (Ray's own lookup decides, as ray.init does)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert serve_ingress.joins_existing_ray() is False
    monkeypatch.delenv("RAY_ADDRESS")
    from ray._private import services

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda addr, temp_dir=None: "127.0.0.1:6379")
    assert serve_ingress.prepare("direct", "127.0.0.1", 18000) == ("proxy", 18000)
    with pytest.raises(Exception, match="ingress"):
        load_settings(None, serve={"ingress": "haproxy"})


def test_a_direct_ingress_replica_binds_with_so_reuseaddr(monkeypatch):
    """Ray 2.60 binds the replica's HTTP socket without SO_REUSEADDR, so a replica restarted after its
    predecessor closed connections waited ~60 s for their TIME_WAIT. The replica swaps the socket
    module Serve's HTTP code sees (deploy/serve_ingress.py); only under direct ingress."""
    import socket as sockets

    from ray.serve._private import http_util

    from masklet.deploy.serve_ingress import reuse_address_in_replica

    monkeypatch.setattr(http_util, "socket", sockets)  # restored after the test
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    assert reuse_address_in_replica() is False and http_util.socket is sockets
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    assert reuse_address_in_replica() is True and reuse_address_in_replica() is True
    with http_util.socket.socket(http_util.socket.AF_INET, http_util.socket.SOCK_STREAM) as created:
        assert created.getsockopt(sockets.SOL_SOCKET, sockets.SO_REUSEADDR) == 1
        created.bind(("127.0.0.1", 0))  # the rest of the module is the real one
    assert http_util.socket.AF_INET6 == sockets.AF_INET6 and http_util.socket.error is OSError


def test_the_front_gate_answers_before_serve_in_a_direct_ingress_replica(monkeypatch):
    """Under direct ingress the replica's HTTP server runs Serve's request handling (~1 ms of the event
    loop per request here) before the app's guard; the API replica puts a second instance of that guard
    in front of it through Serve's own middleware hook (deploy/serve_ingress.py, "The front gate"). Ray's
    code composes it here as in the replica: refusals (401, 503 + Retry-After at the cap) never reach
    Serve's handler; Serve's token-free routes stay token-free; a proxy without a token gets none."""
    import asyncio

    from ray.serve._private import http_util
    from ray.serve.config import HTTPOptions

    from masklet.deploy import serve_ingress
    from masklet.deploy.api_security import ApiLimits

    assert serve_ingress.direct_ingress_env(18000)["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == \
        serve_ingress.FRONT_GATE_IMPORT_PATH
    monkeypatch.setattr(http_util, "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", serve_ingress.FRONT_GATE_IMPORT_PATH)
    monkeypatch.setattr(serve_ingress, "_front_gate_config", None)  # restored after the test
    monkeypatch.delenv("MASKLET_API_TOKEN", raising=False)
    monkeypatch.delenv("MASKLET_CONFIG", raising=False)
    # a proxy with no token in its environment (tests/serve/test_proxy_gate.py has one): nothing installed
    assert http_util.configure_http_middlewares(HTTPOptions()).middlewares == []
    limits = ApiLimits(max_body_bytes=1000, max_streams=4, max_in_flight=1)
    serve_ingress.install_front_gate("tok", limits)
    middlewares = http_util.configure_http_middlewares(HTTPOptions()).middlewares

    reached: list[str] = []
    release = asyncio.Event()

    async def serve_handler(scope, receive, send):  # stands for Serve's _direct_ingress_asgi
        reached.append(scope["path"])
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    server_app = http_util._apply_middlewares(serve_handler, middlewares)

    async def call(path: str, token: str | None = "tok") -> tuple[int, dict]:
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
                 "scheme": "http", "http_version": "1.1", "asgi": {"version": "3.0"}}
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await server_app(scope, receive, send)
        start = sent[0]
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}

    async def scenario():
        slow = asyncio.create_task(call("/slow"))
        while "/slow" not in reached:
            await asyncio.sleep(0)
        busy = await call("/streams")            # the cap (1) is taken by /slow
        anonymous = await call("/streams", token=None)
        serve_route = await call("/-/healthz", token=None)
        health = await call("/health/live", token=None)  # never counted, never refused
        release.set()
        return await slow, busy, anonymous, serve_route, health

    slow, busy, anonymous, serve_route, health = asyncio.run(scenario())
    assert slow[0] == 200 and busy[0] == 503 and busy[1].get("retry-after") == "1", busy
    assert anonymous[0] == 401 and serve_route[0] == 200 and health[0] == 200
    assert reached == ["/slow", "/-/healthz", "/health/live"], reached  # refusals never reached Serve
    limits.max_in_flight = 5  # Serve's reconfigure changes the app's ApiLimits: the gate reads the same object
    assert asyncio.run(call("/streams"))[0] == 200
