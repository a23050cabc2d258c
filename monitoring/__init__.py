"""Masklet monitoring: metric catalogue and stats (`monitoring.stats`, no Prometheus import) and the
Prometheus exporter (`monitoring.exporter`), plus the Grafana dashboard and alert rules beside them."""
from masklet.monitoring.stats import (
    METRICS,
    STAGES,
    MetricSpec,
    Stats,
    StatsSnapshot,
    frames_reconcile,
    frames_unaccounted,
    merge,
)

__all__ = [
    "METRICS",
    "STAGES",
    "MetricSpec",
    "Stats",
    "StatsSnapshot",
    "frames_reconcile",
    "frames_unaccounted",
    "merge",
]
