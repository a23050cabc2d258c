"""Where `masklet serve` answers HTTP: the API replica itself (`serve.ingress: direct`, the default)
or Ray Serve's HTTP proxy in front of it (`proxy`).

Why direct: Serve's proxy is one more Python event loop, first come first served, in front of the
replica. Under a flood every request waits in it: with 200 requests always outstanding on 2 cores
(bench/serve_overload_bench.py), every answer, the app's own 503s included, took about
concurrency / throughput. With Ray Serve's throughput-optimized mode and direct ingress the replica
runs its own HTTP server (uvicorn), where the app (and Serve's backpressure, past its limits)
answers 503 + Retry-After. Side by side (bench/results/serve_overload_bench.json): /health/live
floods ran at 1,170-1,198 requests/s instead of 287-345, and the app's 503s in an overlay-PNG flood
came back in 163-232 ms p50 instead of 774-910 ms (README "Benchmarks" has the other runs).

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
"""
from __future__ import annotations

import os
import socket
from typing import Literal

Ingress = Literal["direct", "proxy"]


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


def prepare(ingress: Ingress, host: str, port: int, avoid: tuple[int, ...] = ()) -> tuple[Ingress, int]:
    """Before Ray starts: the ingress that will serve and the port Serve's proxy binds. Direct sets
    Ray's switches in this process's environment (its Ray session inherits them) and moves the proxy
    to a free port (not `port`, nor one in `avoid`: the health port); joining a running session
    falls back to the proxy on `port`."""
    if ingress == "direct" and not joins_existing_ray():
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
