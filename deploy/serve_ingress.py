"""Where `masklet serve` answers HTTP: the API replica itself (`serve.ingress: direct`, the default)
or Ray Serve's HTTP proxy in front of it (`proxy`).

Why direct: Serve's proxy is one more Python event loop, first come first served, in front of the
replica. Under a flood every request waits in it: measured on 2 cores with 200 requests always
outstanding (bench/serve_overload_bench.py), it served 144-280 requests/s, so every answer, the
app's own 503s included, took concurrency / throughput, about 0.7-1.2 s. With Ray Serve's
throughput-optimized mode and direct ingress the replica runs its own HTTP server (uvicorn), where
the app (and Serve's backpressure, past its limits) answers 503 + Retry-After. Side by side (bench/results/
serve_overload_bench.json): /health/live floods ran at 1,105-1,205 requests/s instead of 263-307,
and the app's 503s in an overlay-PNG flood came back in 166-342 ms p50 instead of 895-968 ms.

Ray reads these switches from the environment of its processes (the controller allocates the
replica's port; the replica starts the server), so they must be set before this process starts its
Ray session: `masklet serve` does that. A session it joins (RAY_ADDRESS) keeps its own switches:
there the proxy serves, and the command says so.

Ray allocates direct-ingress ports from a range; `direct_ingress_env` makes the range exactly
serve.port, so the API is where the user asked. Serve's proxy still starts (Ray starts direct HTTP
servers only while proxies are enabled) and gets a free port on the same host, which nothing
needs to know.
Two Ray defaults are meant for replicas behind a load balancer and are turned off here, where the
replica is the endpoint:
- a released port is quarantined (~1 min) before reuse: a replica restarted after a crash would
  find its only port quarantined and fail to start;
- a stopping replica keeps its port for 30 s so the balancer can deregister it: Ctrl-C would wait.
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
    }


def joins_existing_ray() -> bool:
    """Would `init_ray()` join a running Ray session rather than start one (whose env we set)?"""
    return bool(os.environ.get("RAY_ADDRESS"))


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def prepare(ingress: Ingress, host: str, port: int) -> tuple[Ingress, int]:
    """Before Ray starts: the ingress that will serve and the port Serve's proxy binds. Direct sets
    Ray's switches in this process's environment (its Ray session inherits them) and moves the proxy
    to a free port; joining a running session falls back to the proxy on `port`."""
    if ingress == "direct" and not joins_existing_ray():
        os.environ.update(direct_ingress_env(port))
        return "direct", free_port(host)
    return "proxy", port
