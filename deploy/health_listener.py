"""A liveness/readiness listener on its own loopback port (`serve.health_port`, default 8001).

Why a second port: every request to the API port waits in a first-come-first-served Python event
loop, Ray Serve's HTTP proxy (`serve.ingress: proxy`) or the replica's own HTTP server (`direct`,
deploy/serve_ingress.py). Under a flood that loop is the queue, whatever the app answers: measured on
2 cores (bench/serve_overload_bench.py), 200 concurrent connections kept /health/live on the API
port at concurrency / throughput, 0.5-1.0 s p50 through the proxy and 0.16-0.19 s with direct
ingress, Serve's own `/-/healthz` alike. A liveness probe that waits in that queue fails exactly
when the server is busiest, and an orchestrator would then restart a healthy server under load.
This listener is a thread of the MaskletAPI replica with its own socket: it answers from state it
reads without waiting on the app (the Kafka check of /health/ready is cached), so it does not queue
behind the API's traffic (4-18 ms p50 in those floods; the worst probes took 19-56 ms in every
direct-ingress flood of the final run, up to 360 ms beside Serve's proxy, and up to 497 ms while a
stream's actors were still starting: the 2 oversubscribed cores, not this process, as an idle
stand-alone listener process probed alongside showed the same outliers).

What it reports:
- `GET /health/live`: 200 while the app's event loop keeps beating (a heartbeat coroutine stamps
  the time every second); 503 once it has been silent for `stall_s` (the replica is wedged: a
  restart helps). Before the app has started there is no beat yet, and the answer is 200.
- `GET /health/ready`: 200 once the model is loaded and, with Kafka, a broker accepts connections;
  else 503 with the reason (`readiness`: the same answer as the API port's /health/ready).
Both bodies are the API's `Health` JSON. Anything else is 404; no request body is read.
"""
from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
# A replaced replica can still hold the port while it drains (graceful_shutdown_timeout_s: 20 s in
# deploy/serve_config.yaml): the new one keeps trying for this long before giving up.
BIND_RETRY_S = 60.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # close() never waits for a slow or idle probe connection


class _Server6(_Server):
    address_family = socket.AF_INET6


class Heartbeat:
    """The time of the app event loop's latest beat (monotonic seconds; None before the first)."""

    def __init__(self) -> None:
        self.last: Optional[float] = None

    def beat(self) -> None:
        self.last = time.monotonic()

    def silent_for(self) -> float:
        return 0.0 if self.last is None else time.monotonic() - self.last

    async def run(self, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        """Beat every `interval_s` on the calling event loop until cancelled."""
        import asyncio

        while True:
            self.beat()
            await asyncio.sleep(interval_s)


def not_ready(state: str, error: Optional[str]) -> dict:
    """The `Health` body of a replica whose session is not ready (slot state "loading" or "failed"):
    one answer for the API's /health/ready and this listener's."""
    return {"status": "loading" if state == "loading" else "unavailable", "ready": False,
            "detail": error or "model is loading"}


def readiness(state: str, error: Optional[str],
              probe: Optional[Callable[[], tuple[bool, str]]] = None) -> tuple[int, dict]:
    """/health/ready's status code and `Health` body, for the API and this listener alike: ready once
    the session slot is "ready" and `probe` (the Kafka reachability check, when the API reads Kafka)
    passes."""
    if state != "ready":
        return 503, not_ready(state, error)
    if probe is not None:
        reachable, detail = probe()
        if not reachable:
            return 503, {"status": "unavailable", "ready": False, "detail": detail}
    return 200, {"status": "ok", "ready": True, "detail": ""}


class HealthListener:
    """Serves /health/live and /health/ready on (host, port) from a daemon thread.

    `state()` returns the session slot's state ("loading", "ready", "failed") and its error; it
    must not block. `probe` (optional) is the readiness check beyond the slot: the Kafka probe, which
    caches its answer. `port=0` picks a free port (`.port` says which).
    """

    def __init__(self, host: str, port: int, heartbeat: Heartbeat, state: Callable[[], tuple[str, Optional[str]]],
                 stall_s: float = 30.0, probe: Optional[Callable[[], tuple[bool, str]]] = None) -> None:
        self.heartbeat, self.state, self.stall_s, self.probe = heartbeat, state, stall_s, probe
        listener = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a connection that sends nothing is dropped, not kept

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                code, body = listener.answer(self.path.split("?", 1)[0])
                payload = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Cache-Control", "no-store")
                if code == 503:
                    self.send_header("Retry-After", "5")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:  # probes every few seconds: no access log
                pass

        self._server = (_Server6 if ":" in host else _Server)((host, port), Handler)
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="masklet-health", daemon=True)

    def start(self) -> "HealthListener":
        self._thread.start()
        return self

    def answer(self, path: str) -> tuple[int, dict]:
        state, error = self.state()
        ready = state == "ready"
        if path == "/health/live":
            silent = self.heartbeat.silent_for()
            if silent > self.stall_s:
                return 503, {"status": "unavailable", "ready": ready,
                             "detail": f"the API event loop has not run for {silent:.0f} s"}
            return 200, {"status": "ok", "ready": ready, "detail": ""}
        if path == "/health/ready":
            return readiness(state, error, self.probe)
        return 404, {"detail": "not found: this port serves /health/live and /health/ready"}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class HealthService:
    """The replica's listener, started now or, while its port is still held (by the replica this one
    replaces), by a retrying thread; `close()` stops either. Never raises: a listener that cannot
    start is logged, and the API port's own /health/* routes still answer."""

    def __init__(self, host: str, port: Optional[int], heartbeat: Heartbeat,
                 state: Callable[[], tuple[str, Optional[str]]], stall_s: float = 30.0,
                 retry_s: float = BIND_RETRY_S, probe: Optional[Callable[[], tuple[bool, str]]] = None) -> None:
        self.listener: Optional[HealthListener] = None
        self._args = (host, port, heartbeat, state, stall_s, probe)
        self._closed, self._lock = threading.Event(), threading.Lock()
        if port is None or port == -1:  # -1: off, as on the command line
            return
        if not 0 <= port <= 65535:
            log.error("health listener not started: port %s is not in 0-65535", port)
            return
        if not self._try(final=retry_s <= 0):
            log.warning("health port %s:%s is taken; retrying for %.0f s (a replica being replaced?)",
                        host, port, retry_s)
            threading.Thread(target=self._retry, args=(retry_s,), name="masklet-health-bind", daemon=True).start()

    def _try(self, final: bool) -> bool:
        host, port, heartbeat, state, stall_s, probe = self._args
        try:
            listener = HealthListener(host, port, heartbeat, state, stall_s, probe)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and not final:
                return False
            log.error("health listener on %s:%s not started (%s); /health/* is served on the API port only",
                      host, port, exc)
            return True
        with self._lock:  # close() may run meanwhile, from the replica's shutdown
            if self._closed.is_set():
                listener.close()
                return True
            self.listener = listener.start()
        log.info("health listener on %s (/health/live, /health/ready)", listener.url)
        return True

    def _retry(self, retry_s: float) -> None:
        deadline = time.monotonic() + retry_s
        while not self._closed.wait(1.0):
            if self._try(final=time.monotonic() >= deadline):
                return

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            if self.listener is not None:
                self.listener.close()
