"""A liveness/readiness listener on its own loopback port (`serve.health_port`, default 8001).

Why a second port: every request to the API port goes through Ray Serve's HTTP proxy, one Python
event loop that serves requests first come, first served. Under a flood it is the queue, whatever
the app answers: measured on 2 cores (bench/serve_overload_bench.py), 200 concurrent connections
kept its latency near concurrency / throughput = 200 / ~300 requests/s, about 0.6-2 s, for every
route, Serve's own `/-/healthz` included. A liveness probe that waits in that queue fails exactly
when the server is busiest, and an orchestrator would then restart a healthy server under load.
This listener is a thread of the MaskletAPI replica with its own socket: it answers from state it
reads without locks, so it does not queue behind the proxy or the app.

What it reports:
- `GET /health/live`: 200 while the app's event loop keeps beating (a heartbeat coroutine stamps
  the time every second); 503 once it has been silent for `stall_s` (the replica is wedged: a
  restart helps). Before the app has started there is no beat yet, and the answer is 200.
- `GET /health/ready`: 200 once the model is loaded, else 503 with the slot's state.
Both bodies are the API's `Health` JSON. Anything else is 404; no request body is read.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0


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


class HealthListener:
    """Serves /health/live and /health/ready on (host, port) from a daemon thread.

    `state()` returns the session slot's state ("loading", "ready", "failed") and its error; it
    must not block. `port=0` picks a free port (`.port` says which).
    """

    def __init__(self, host: str, port: int, heartbeat: Heartbeat, state: Callable[[], tuple[str, Optional[str]]],
                 stall_s: float = 30.0) -> None:
        self.heartbeat, self.state, self.stall_s = heartbeat, state, stall_s
        listener = self

        class Handler(BaseHTTPRequestHandler):
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

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
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
            return 200, {"status": "ok", "ready": ready, "detail": None}
        if path == "/health/ready":
            if ready:
                return 200, {"status": "ok", "ready": True, "detail": None}
            return 503, {"status": "loading" if state == "loading" else "unavailable", "ready": False,
                         "detail": error or "model is loading"}
        return 404, {"detail": "not found: this port serves /health/live and /health/ready"}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_health_listener(host: str, port: Optional[int], heartbeat: Heartbeat,
                          state: Callable[[], tuple[str, Optional[str]]], stall_s: float = 30.0) -> Optional[HealthListener]:
    """Start it, or log why not and return None (port None: off; port taken: the API's own
    /health/* routes still answer, through the proxy)."""
    if port is None:
        return None
    try:
        listener = HealthListener(host, port, heartbeat, state, stall_s).start()
    except OSError as exc:
        log.error("health listener on %s:%s not started (%s); /health/* is served on the API port only",
                  host, port, exc)
        return None
    log.info("health listener on %s (/health/live, /health/ready)", listener.url)
    return listener
