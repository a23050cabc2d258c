"""`--metrics-host` / `--metrics-port` for the processes without Serve (`masklet run`, `masklet ingest`).

Both serve `/metrics` by default, on loopback (Prometheus' exposition of `monitoring.stats`, every
actor's stats merged: `KafkaRunner.stats_snapshot()`). When the default port is taken (a `run` and
an `ingest` on one machine), the second process says so and serves on a free port instead of
failing; an explicitly chosen port that is taken is an error.
"""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Any, Callable, Optional

DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9464  # the OpenTelemetry/Prometheus exporter convention


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-host", default=DEFAULT_METRICS_HOST,
                        help="address of /metrics (default: loopback only)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help=f"port of /metrics (default {DEFAULT_METRICS_PORT}, or a free one if that is taken; "
                             f"0: any free port)")
    parser.add_argument("--no-metrics", action="store_true", help="serve no /metrics")


def start_metrics(args: argparse.Namespace, snapshot_fn: Callable[[], Any], command: str) -> Optional[Any]:
    """Start the endpoint (`MetricsServer`, `.url`, `.close()`) and print where it is; None when off.
    Raises OSError when an explicit `--metrics-port` cannot be bound."""
    from masklet.monitoring.exporter import start_metrics_server

    if args.no_metrics:
        return None
    port = DEFAULT_METRICS_PORT if args.metrics_port is None else args.metrics_port
    try:
        server = start_metrics_server(snapshot_fn, host=args.metrics_host, port=port)
    except OSError as exc:
        if args.metrics_port is not None or exc.errno != errno.EADDRINUSE:
            raise
        server = start_metrics_server(snapshot_fn, host=args.metrics_host, port=0)
        print(f"masklet {command}: port {port} is taken (another masklet process?); metrics on port "
              f"{server.port} instead", file=sys.stderr)
    print(f"masklet {command}: metrics on {server.url}", file=sys.stderr, flush=True)
    return server
