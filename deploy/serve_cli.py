"""`masklet serve`: the HTTP control API, web console and /metrics on Ray Serve.

Safe by default: binds 127.0.0.1, requires `Authorization: Bearer <token>` (MASKLET_API_TOKEN;
one is generated and printed when unset), and starts Ray without its dashboard, whose job API
has no authentication (CVE-2023-48022). Publish it beyond loopback only behind TLS.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from masklet.deploy.model_args import add_model_arguments, model_overrides


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP control API and web console (Ray Serve)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--health-port", type=int, default=None,
                   help="port of the health listener (/health/live, /health/ready; same host): it answers "
                        "under any load, whatever queues on the API port (default: serve.health_port, 8001; -1: off)")
    p.add_argument("--ingress", choices=("direct", "proxy"), default=None,
                   help="who answers HTTP on --port: the API replica itself (direct: one event loop fewer, so a "
                        "flood is answered several times sooner) or Ray Serve's proxy (default: serve.ingress, direct)")
    add_model_arguments(p)
    p.add_argument("--max-streams", type=int, help="stream cap (default: serve.max_streams)")
    p.add_argument("--kafka", action="store_true",
                   help="allow Kafka-sourced streams and require the broker for readiness (kafka.* settings)")
    p.add_argument("--config", type=Path, help="YAML config (model, pipeline, kafka, serve sections)")
    p.set_defaults(func=run_serve)


HEALTH_PORT_HOW = "choose another with --health-port or serve.health_port, or -1 to turn it off"


def serve_options(args: argparse.Namespace, token: str, settings: Any = None) -> dict:
    """The MaskletAPI deployment's options (deploy.serve_deployment:app args). `settings` (the CLI's
    MaskletSettings) places the health listener beside the API (host, health_port)."""
    names = {"name": "model", "factory": "model_factory"}
    options = {names.get(field, field): value for field, value in model_overrides(args).items()}
    options.update({"kafka": bool(args.kafka), "token": token})
    if settings is not None:
        options.update({"health_host": settings.serve.host, "health_port": settings.serve.health_port})
    if args.config is not None:
        options["config"] = str(args.config.resolve())
    if args.max_streams is not None:
        options["max_streams"] = args.max_streams
    return options


def _check_free(host: str, port: Any, what: str = "health port", how: str = HEALTH_PORT_HOW) -> None:
    """Fail before Ray starts when a port the replica binds is taken: it would only log it (the health
    listener), or give up after Ray's retries with a traceback (the direct-ingress API port)."""
    import socket

    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener binds: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"{what} {host}:{port} is not free ({exc.strerror}); {how}") from None


def run_serve(args: argparse.Namespace) -> int:
    from masklet.deploy.api_security import generate_token
    from masklet.pipeline.config import ConfigError, load_settings
    from masklet.deploy.segment import RANDOM_WEIGHTS_WARNING

    try:
        serve_overrides = {"host": args.host, "port": args.port}
        if getattr(args, "ingress", None):
            serve_overrides["ingress"] = args.ingress
        if args.health_port is not None:
            if args.health_port == 0:
                raise ValueError("--health-port 0 would pick a port no probe could know; give one, or -1 for none")
            serve_overrides["health_port"] = None if args.health_port == -1 else args.health_port
        settings = load_settings(args.config, serve=serve_overrides, model=model_overrides(args))
        _check_free(settings.serve.host, settings.serve.health_port)
        _check_free(settings.serve.host, settings.serve.port, "API port", "choose another with --port")
        from masklet.deploy.api_limits import deployment_limits

        deployment_limits()  # Serve's request limits come from deploy/serve_config.yaml: readable and consistent
    except (ConfigError, ValueError, OSError) as exc:
        print(f"masklet serve: error: {exc}", file=sys.stderr)
        return 2
    token = settings.serve.api_token.get_secret_value() if settings.serve.api_token else None
    if not token:
        token = generate_token()
        print(f"MASKLET_API_TOKEN is not set; generated API token (send as 'Authorization: Bearer <token>'):\n"
              f"  {token}", file=sys.stderr)
    if settings.model.checkpoint == "random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)

    from masklet.deploy import serve_ingress

    # Before Ray starts: direct ingress is switched on in the environment its processes inherit
    avoid = (settings.serve.health_port,) if settings.serve.health_port else ()
    ingress, proxy_port = serve_ingress.prepare(settings.serve.ingress, settings.serve.host, settings.serve.port,
                                                avoid=avoid, token=token if settings.serve.proxy_gate else None,
                                                config=str(args.config.resolve()) if args.config else None)
    if ingress != settings.serve.ingress:
        print("masklet serve: joining a running Ray session (RAY_ADDRESS or `ray start`), whose Serve switches "
              "are its own: Ray Serve's proxy serves the API (serve.ingress: proxy)", file=sys.stderr)

    import ray
    from ray import serve

    from masklet.deploy.serve_deployment import app

    from masklet.actors.backend import init_ray

    init_ray(include_dashboard=False, configure_logging=False)  # never expose the dashboard/job API
    # No access-log line per request (Serve's proxy and the replica): a flood of thousands of requests/s
    # printed as many lines/s here, each also shipped from a log file by Ray's log monitor; requests are
    # counted in /metrics, and errors are still logged.
    quiet = {"enable_access_log": False}
    serve.start(http_options={"host": settings.serve.host, "port": proxy_port}, logging_config=quiet)
    serve.run(app(serve_options(args, token, settings)), name="masklet", route_prefix="/", logging_config=quiet)
    health = settings.serve.health_port
    where = "served by the API replica" if ingress == "direct" else "through Ray Serve's proxy"
    host = f"[{settings.serve.host}]" if ":" in settings.serve.host else settings.serve.host  # IPv6 in a URL
    print(f"masklet serve: console and API on http://{host}:{settings.serve.port}/ ({where}; "
          f"readiness: /health/ready)" + (f"; probes: http://{host}:{health}/health/live and "
                                          f"/health/ready (answer under any load)" if health else ""),
          file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
