"""Where `masklet serve` answers HTTP: the API replica itself (`serve.ingress: direct`, the default)
or Ray Serve's HTTP proxy in front of it (`proxy`).

Why direct: Serve's proxy is one more Python event loop, first come first served, in front of the
replica. Under a flood every request waits in it: with 200 requests always outstanding on 2 cores
(bench/serve_overload_bench.py), every answer, the app's own 503s included, took about
concurrency / throughput. With Ray Serve's throughput-optimized mode and direct ingress the replica
runs its own HTTP server (uvicorn), where the app (and Serve's backpressure, past its limits)
answers 503 + Retry-After. Side by side (bench/results/serve_overload_bench.json): /health/live
floods ran at 943-1,242 requests/s instead of 248-265, and the app's 503s in an overlay-PNG flood
came back in 78-96 ms p50 (with the front gate below) instead of 869-997 ms (README "Benchmarks").

Ray reads these switches from the environment of its processes (the controller allocates the
replica's port; the replica starts the server), so they must be set before this process starts its
Ray session: `masklet serve` does that. A session it joins (RAY_ADDRESS) keeps its own switches:
there the proxy serves, and the command says so.

Ray allocates direct-ingress ports from a range; `direct_ingress_env` makes the range exactly
serve.port, so the API is where the user asked. Serve's proxy still starts (Ray starts direct HTTP
servers only while proxies are enabled) on a free port of the same host: it serves the same app,
bearer token and all, plus Serve's token-free `/-/routes` and `/-/healthz`; with a host beyond
loopback that port is reachable too (the replica's server takes its host from the same option).
Ray's defaults for a replica behind a load balancer are changed where the replica is the endpoint:
- a released port is quarantined (150 s) before reuse: a replica restarted after a crash would find
  its only port quarantined and fail to start;
- a stopping replica keeps its port for 30 s so the balancer can deregister it: Ctrl-C would wait;
- the listening socket is bound without SO_REUSEADDR, so after serving connections it closed
  itself (every `Connection: close` request) a restarted replica could not bind the port until
  those connections' TIME_WAIT ended (measured: back after 62 s instead of 11 s). The replica sets
  it (`reuse_address_in_replica`, from the MaskletAPI constructor, which runs before Serve starts
  the server);
- Serve's throughput mode sends the replica's logs and prints to a file only: they stay on stderr.

The front gate: in the replica's server, Serve handles each request (request metadata, its own
backpressure, a receive proxy, metrics) before the app's guard sees it, about 1 ms of the event
loop's time per request here. Under a flood the app's 503s waited behind that work for everyone:
with 200 requests always outstanding, 160-537 ms p50 without the gate, 63-219 ms with it, side by
side on this machine, floods right after a stream started (the goal is 100 ms; 78-96 ms in the final
bench run, which waits for the stream's actors to start). Ray calls the middleware hook named by
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH wherever it starts an HTTP server; in the API replica
`front_gate` answers with a second instance of the app's own guard (api_security.GuardMiddleware:
token, in-flight and SSE caps, declared body size; a body sent without Content-Length is cut at the
cap by the app's guard) in front of Serve, so a refused request costs uvicorn and that guard only.
It shares the app's ApiLimits (live reconfigure applies to both). The app keeps its own guard, which
still guards whatever arrives through Serve's proxy; the front counts first, so the inner count
never exceeds it.

The proxy gate: Ray calls the same hook in Serve's proxy. Where `masklet serve` answers through the
proxy (`--ingress proxy`, or a RayService: deploy/rayservice.yaml sets the same variables on the
head pod), the proxy has no app to share limits with, so `front_gate` builds the guard there from
the proxy's environment (`proxy_gate_env`: the hook, MASKLET_API_TOKEN, MASKLET_CONFIG; MASKLET_*
as anywhere): token, and the caps on requests in flight and on SSE feeds, counted over everything
that passes this proxy. Past them the proxy answers 503 + Retry-After itself, before routing the
request to the replica (/health/live floods pass the proxy at 170-265 requests/s here). Body sizes
stay with the app (its cap changes live). Side by side, 200 outstanding overlay-PNG requests: the
proxy's 503s in 244-556 ms p50 with the gate, 1,006-1,199 ms without, in two runs of
bench/serve_overload_bench.py (the proxy and the replica then use 0.7-0.9 cores each).
Off with serve.proxy_gate: false (one proxy in front of several Masklet applications would count
them together); without a token the proxy gets no gate. The app's guard stands behind it either way.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Optional, Literal

log = logging.getLogger(__name__)
Ingress = Literal["direct", "proxy"]
FRONT_GATE_IMPORT_PATH = "masklet.deploy.serve_ingress:front_gate"
# (token, ApiLimits) of the API replica in this process, once its app is built (`install_front_gate`)
_front_gate_config: Optional[tuple[str, Any]] = None


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's switches for a direct-ingress replica serving HTTP on exactly `port`."""
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",         # direct ingress, user code on the server's loop
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),   # exclusive: the one port
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_LOG_TO_STDERR": "1",
        # Serve's hook for HTTP server middlewares, called in each process that starts one: the
        # replica puts the API's guard in front of Serve's request handling (`front_gate`)
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": FRONT_GATE_IMPORT_PATH,
    }


def joins_existing_ray() -> bool:
    """Would `init_ray()` join a running Ray session (RAY_ADDRESS, or a `ray start` cluster recorded
    on this machine) rather than start one that inherits our environment?"""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is not None
    except ImportError:  # another Ray layout: the environment variable still says it
        return os.environ.get("RAY_ADDRESS", "local") != "local"
    except Exception:  # noqa: BLE001 - an unparsable RAY_ADDRESS: ray.init will say so itself
        return True


def free_port(host: str, avoid: tuple[int, ...] = ()) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port not in avoid:
            return port


def proxy_gate_env(token: str, config: Optional[str] = None) -> dict[str, str]:
    """What Serve's proxy needs to put the API's guard in front of its own work (`front_gate`): the
    hook, the bearer token and the config file whose `limits` the guard enforces. A RayService sets
    the same variables on its head pod (deploy/rayservice.yaml)."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": FRONT_GATE_IMPORT_PATH, "MASKLET_API_TOKEN": token,
            **({"MASKLET_CONFIG": config} if config else {})}


def prepare(ingress: Ingress, host: str, port: int, avoid: tuple[int, ...] = (), *,
            token: Optional[str] = None, config: Optional[str] = None) -> tuple[Ingress, int]:
    """Before Ray starts: the ingress that will serve and the port Serve's proxy binds. Sets, in this
    process's environment (its Ray session inherits it), the proxy's gate (`proxy_gate_env`, given a
    `token`; none without) and, for direct, Ray's switches, and moves the proxy to a free port (not
    `port`, nor one in `avoid`: the health port); joining a running session changes nothing and
    falls back to the proxy on `port`."""
    if joins_existing_ray():
        return "proxy", port
    # no token: no gate, even where the proxy would find one in the environment (MASKLET_API_TOKEN)
    os.environ.update(proxy_gate_env(token, config) if token else {"MASKLET_SERVE__PROXY_GATE": "false"})
    if ingress == "direct":
        os.environ.update(direct_ingress_env(port))
        return "direct", free_port(host, avoid=(port, *avoid))
    return "proxy", port


class _ReuseAddressSockets:
    """The `socket` module as Serve's HTTP utilities see it, except that new sockets are created with
    SO_REUSEADDR (Linux: a listener may bind while the port's old connections are in TIME_WAIT)."""

    def __getattr__(self, name: str):
        return getattr(socket, name)

    @staticmethod
    def socket(*args, **kwargs) -> socket.socket:
        created = socket.socket(*args, **kwargs)
        created.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return created


def reuse_address_in_replica() -> bool:
    """In a direct-ingress replica, before Serve starts its HTTP server: have it bind with
    SO_REUSEADDR (see the module notes). Ray 2.60 creates that socket in
    `ray.serve._private.http_util` with no such option; this swaps the `socket` module that code
    sees for one that sets it. True when in place; False (and nothing changed) outside direct
    ingress or where Ray's layout differs, and then a restart may wait out TIME_WAIT."""
    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        return False
    try:
        from ray.serve._private import http_util
    except ImportError:
        return False
    current = getattr(http_util, "socket", None)
    if isinstance(current, _ReuseAddressSockets):
        return True
    if current is not socket:
        return False
    http_util.socket = _ReuseAddressSockets()
    return True


def install_front_gate(token: str, limits: Any) -> None:
    """From the API replica, once its app (and so its ApiLimits) exists and before Serve starts the
    replica's HTTP server: what `front_gate` puts in front of Serve in this process."""
    global _front_gate_config
    _front_gate_config = (token, limits)


def _proxy_gate_config() -> Optional[tuple[str, Any]]:
    """(token, ApiLimits) for the guard in Serve's proxy, from its environment (`proxy_gate_env`);
    None without a token there. Only the caps on requests in flight (ordinary and SSE) and the token:
    body sizes stay with the app, whose cap `reconfigure` changes live."""
    from masklet.deploy.api_security import ApiLimits
    from masklet.pipeline.config import ConfigError, load_settings

    try:
        settings = load_settings(None)  # MASKLET_CONFIG and MASKLET_* of this process's environment
    except ConfigError as exc:  # the app's own guard still stands behind; the proxy must start
        log.warning("no API guard in Serve's proxy: %s", exc)
        return None
    token = os.environ.get("MASKLET_API_TOKEN") or (
        settings.serve.api_token.get_secret_value() if settings.serve.api_token else None)
    if not token or not settings.serve.proxy_gate:
        return None
    return token, ApiLimits(max_body_bytes=None, max_streams=settings.serve.max_streams,
                            max_in_flight=settings.limits.max_in_flight_requests,
                            max_event_streams=settings.limits.max_event_streams)


def front_gate() -> list:
    """Serve's HTTP middleware hook (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): the API's guard in
    front of Serve's own request handling, in the API replica's server (direct ingress, with the app's
    own ApiLimits) and in Serve's proxy (from its environment: `proxy_gate_env`); nothing in a process
    that has neither."""
    config = _front_gate_config or _proxy_gate_config()
    if config is None:
        return []
    from starlette.middleware import Middleware

    from masklet.deploy.api_security import DEFAULT_PUBLIC_PATHS, SERVE_HEALTH_PATHS, GuardMiddleware

    token, limits = config
    # Serve's own routes on this port stay as token-free as they are through its proxy. A body without
    # Content-Length is cut at the cap by the app's own guard: raised here, inside Serve's receive
    # task, it would end the request as a client gone (499) instead of a 413.
    return [Middleware(GuardMiddleware, token=token, limits=limits,
                       public_paths=(*DEFAULT_PUBLIC_PATHS, *SERVE_HEALTH_PATHS), cut_streamed_bodies=False)]
