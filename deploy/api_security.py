"""The API's guard as one pure ASGI middleware: bearer token, body-size cap, in-flight cap.

Pure ASGI (not BaseHTTPMiddleware) so that it also guards streaming responses (SSE) and can cut
a chunked upload off at the cap while it is still arriving, instead of after buffering it.

Order of checks: 401 before anything else (an anonymous caller learns nothing, not even which
paths exist), then 503 when too many requests are in flight (fail fast, never queue), then 413
for bodies over the cap. Three classes of requests: /health/* (never refused, never counted: a
liveness probe must answer under any load; so are Serve's /-/healthz and /-/routes), SSE feeds
(/streams/{id}/events, their own cap) and everything else (`max_in_flight`).
"""
from __future__ import annotations

import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Optional

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

RETRY_AFTER_S = 1
# Console assets carry no data; the page asks for the token and sends it with every API call.
DEFAULT_PUBLIC_PATHS = ("/health/live", "/health/ready", "/", "/console/index.html", "/console/app.js",
                        "/console/style.css", "/favicon.ico")


# Ray Serve's own health and routes answers: they reach this guard only where it stands in front of
# Serve (deploy/serve_ingress.py, "The front gate"), and are treated like /health/* there
SERVE_HEALTH_PATHS = ("/-/healthz", "/-/routes")
EVENT_STREAM_PATH = re.compile(r"^/streams/[^/]+/events$")


def request_class(path: str) -> str:
    """"health", "events" (an SSE feed) or "request": each class has its own cap (or none)."""
    if path.startswith("/health/") or path in SERVE_HEALTH_PATHS:
        return "health"
    return "events" if EVENT_STREAM_PATH.match(path) else "request"


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def token_matches(header_value: str, token: str) -> bool:
    scheme, _, presented = header_value.partition(" ")
    # compare_digest on bytes: constant time whatever the presented value is (length leaks only).
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


async def send_json_error(send: Send, status: int, detail: str, headers: Iterable[tuple[str, str]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class ApiLimits:
    """Limits read on every request, so Serve's `reconfigure` (user_config) can change them live.

    `max_in_flight` caps ordinary requests and `max_event_streams` the open SSE feeds, each on its
    own: long-lived feeds never take the slots of other routes. /health/* has no cap at all.
    """

    max_body_bytes: Optional[int]   # None: not checked by this guard (Serve's proxy: the app checks)
    max_streams: int
    max_in_flight: int = 40
    max_event_streams: int = 16


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI re-raises HTTPExceptions met while reading a body as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the {limit}-byte limit")


class GuardMiddleware:
    def __init__(self, app: Any, *, token: str, limits: ApiLimits,
                 public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS, cut_streamed_bodies: bool = True) -> None:
        """`cut_streamed_bodies`: also stop a body without Content-Length at the cap while it arrives
        (raised from `receive`). Off where the next app reads the body in a task of its own (Ray Serve's
        direct ingress, which takes such an error for a client gone: 499): a guard behind it cuts it."""
        if not token:
            raise ValueError("the API needs a non-empty bearer token")
        self.app = app
        self.token = token
        self.limits = limits
        self.public_paths = frozenset(public_paths)
        self.cut_streamed_bodies = cut_streamed_bodies
        self.in_flight = 0  # one event loop per process: no lock needed
        self.events_open = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["path"] not in self.public_paths and not token_matches(headers.get("authorization", ""), self.token):
            await send_json_error(send, 401, "missing or invalid bearer token (Authorization: Bearer <token>)",
                                  [("www-authenticate", 'Bearer realm="masklet"')])
            return
        kind = request_class(scope["path"])
        if kind == "events" and self.events_open >= self.limits.max_event_streams:
            await send_json_error(send, 503, f"too many event streams open ({self.events_open}); retry later",
                                  [("retry-after", str(RETRY_AFTER_S))])
            return
        if kind == "request" and self.in_flight >= self.limits.max_in_flight:
            await send_json_error(send, 503, f"server busy ({self.in_flight} requests in flight); retry shortly",
                                  [("retry-after", str(RETRY_AFTER_S))])
            return
        declared = headers.get("content-length")
        cap = self.limits.max_body_bytes
        if cap is not None and declared is not None and (not declared.isdigit() or int(declared) > cap):
            await send_json_error(send, 413, f"request body over the {cap}-byte limit")
            return
        self._count(kind, +1)
        try:
            await self._guarded(scope, receive, send)
        finally:
            self._count(kind, -1)

    def _count(self, kind: str, step: int) -> None:
        if kind == "events":
            self.events_open += step
        elif kind == "request":
            self.in_flight += step

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.cut_streamed_bodies:
            await self.app(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limits.max_body_bytes:  # chunked bodies have no content-length to check
                    raise BodyTooLarge(self.limits.max_body_bytes)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_json_error(send, 413, f"request body over the {self.limits.max_body_bytes}-byte limit")
