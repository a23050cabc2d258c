"""Prometheus exposition of Masklet's stats snapshots (the only module that imports prometheus_client).

How aggregation works ("the Ray way"):

* Each Ray actor (decoders, encoder replicas, trackers, publishers, stream controllers) keeps its own
  `monitoring.stats.Stats` and exposes it through a method named `stats_snapshot()` that returns a
  `StatsSnapshot`: plain data that pickles across actor boundaries.
* The driver (`masklet run`) or the Serve app (`masklet serve`) gathers those snapshots with
  `gather_actor_snapshots`, merges them with `monitoring.stats.merge`, and serves the result on
  its own `/metrics` through `render_latest` or `SnapshotCollector`.
* So one scrape target per deployment shows the whole pipeline, and we never open Ray's own
  metrics-export or dashboard ports, which have no authentication.

Processes without Serve (`masklet run`, `masklet ingest`) call `start_metrics_server`. Unlike
prometheus_client's own `start_http_server`, it binds to loopback unless told otherwise.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from masklet.monitoring.stats import METRICS, MetricSpec, StatsSnapshot, merge

SnapshotFn = Callable[[], StatsSnapshot]

__all__ = [
    "CONTENT_TYPE_LATEST",
    "SnapshotCollector",
    "build_registry",
    "gather_actor_snapshots",
    "render_latest",
    "start_metrics_server",
]


def _format_bound(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _empty_family(name: str, spec: MetricSpec) -> Metric:
    labels = list(spec.labels)
    if spec.kind == "counter":
        # The family name drops "_total"; the client appends it to the sample name again.
        return CounterMetricFamily(name, spec.help, labels=labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(name, spec.help, labels=labels)
    return HistogramMetricFamily(name, spec.help, labels=labels)


def snapshot_to_families(snapshot: StatsSnapshot) -> list[Metric]:
    """One metric family per catalogue entry, in catalogue order, each with the snapshot's series."""
    families = []
    for name, spec in METRICS.items():
        family = _empty_family(name, spec)
        for row in snapshot.rows(name):
            label_values = [row["labels"][label] for label in spec.labels]
            if spec.kind == "histogram":
                assert spec.buckets is not None
                running, buckets = 0, []
                for bound, count in zip(list(spec.buckets) + [math.inf], row["bucket_counts"]):
                    running += count
                    buckets.append((_format_bound(bound), float(running)))
                family.add_metric(label_values, buckets, row["sum"])
            else:
                family.add_metric(label_values, row["value"])
        families.append(family)
    return families


class SnapshotCollector(Collector):
    """A custom collector that renders whatever `snapshot_fn()` returns at scrape time."""

    def __init__(self, snapshot_fn: SnapshotFn) -> None:
        self._snapshot_fn = snapshot_fn

    def collect(self) -> Iterator[Metric]:
        yield from snapshot_to_families(self._snapshot_fn())

    def describe(self) -> Iterator[Metric]:
        # Lets the registry check for name clashes at register time without calling snapshot_fn.
        for name, spec in METRICS.items():
            yield _empty_family(name, spec)


def build_registry(snapshot_fn: SnapshotFn) -> CollectorRegistry:
    """A fresh registry holding only Masklet's metrics (no process/GC/platform collectors)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SnapshotCollector(snapshot_fn))
    return registry


def render_latest(snapshot: StatsSnapshot) -> bytes:
    """Text exposition format for a `/metrics` response; serve it with `CONTENT_TYPE_LATEST`."""
    return generate_latest(build_registry(lambda: snapshot))


class MetricsServer:
    """Handle on a running metrics endpoint; `close()` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread

    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(snapshot_fn: SnapshotFn, host: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
    """Serve `/metrics` from a daemon thread; `port=0` picks a free port (see `.port`)."""
    server, thread = start_http_server(port, addr=host, registry=build_registry(snapshot_fn))
    return MetricsServer(server, thread)


def gather_actor_snapshots(handles: Sequence[Any], timeout_s: float = 2.0,
                           method: str = "stats_snapshot") -> StatsSnapshot:
    """Merge `handle.<method>()` from every Ray actor that answers within `timeout_s`.

    Actors that are slow, dead or restarting are left out of this scrape rather than stalling
    it; their counters reappear on the next one (a restarted actor starts from zero, which
    Prometheus' rate() treats as a counter reset).
    """
    import ray  # imported here so that the exporter works in processes without Ray

    refs = [getattr(handle, method).remote() for handle in handles]
    if not refs:
        return merge([])
    ready, _pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    snapshots: list[StatsSnapshot] = []
    for ref in ready:
        try:
            snapshots.append(ray.get(ref))
        except ray.exceptions.RayError:
            continue
    return merge(_as_snapshots(snapshots))


def _as_snapshots(values: Iterable[Any]) -> Iterator[StatsSnapshot]:
    for value in values:
        yield value if isinstance(value, StatsSnapshot) else StatsSnapshot.from_dict(value)
