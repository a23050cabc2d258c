"""Masklet metrics as plain Python: a fixed catalogue, a thread-safe recorder, mergeable snapshots.

This module never imports prometheus_client. Every actor (decoder, encoder, tracker, publisher,
stream controller) owns one `Stats`, records into it on its hot path, and hands out
`Stats.snapshot()` values. A snapshot is a frozen dataclass over plain dicts, lists, strings and
numbers, so it pickles across Ray actor boundaries and serialises to JSON. The driver or the Serve
app calls `merge()` over the snapshots of all actors and gives the result to
`monitoring.exporter` for `/metrics`.

    from masklet.monitoring.stats import Stats
    stats = Stats()
    stats.inc("masklet_frames_in_total", source_type="rtsp")
    stats.observe("masklet_stage_latency_seconds", 0.012, stage="encode")
    stats.set("masklet_active_objects", 3)
    with stats.timer("masklet_stage_latency_seconds", stage="decode"):
        ...

Reconciliation contract (checked by `frames_reconcile`): once a run has drained, every frame
counted in `masklet_frames_in_total` was either published or counted in
`masklet_frames_dropped_total{reason}`. A frame sent to the dead-letter topic is therefore counted
both in `masklet_deadletter_total` and as a drop (e.g. reason="undecodable").
"""
from __future__ import annotations

import bisect
import copy
import itertools
import json
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Iterator, Literal, Mapping

MetricKind = Literal["counter", "gauge", "histogram"]

STAGES = ("decode", "queue", "encode", "track", "publish")
BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
STAGE_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
END_TO_END_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Label values come from code paths, not from data, but a bug (an exception text used as a
# reason, say) must not grow memory without bound; extra values fold into this one.
MAX_SERIES_PER_METRIC = 256
OVERFLOW_LABEL_VALUE = "other"


@dataclass(frozen=True)
class MetricSpec:
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    # Closed value sets for labels whose values are part of the contract (dashboards key on them).
    allowed_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


METRICS: dict[str, MetricSpec] = {
    "masklet_frames_in_total": MetricSpec(
        "counter", "Frames accepted from a source.", ("source_type",)),
    "masklet_frames_dropped_total": MetricSpec(
        "counter", "Frames dropped before publishing, by reason.", ("reason",)),
    "masklet_frames_encoded_total": MetricSpec(
        "counter", "Frames run through the image encoder."),
    "masklet_frames_published_total": MetricSpec(
        "counter", "Frames whose masklet record every sink accepted."),
    "masklet_encoder_batch_size": MetricSpec(
        "histogram", "Frames per encoder forward pass.", buckets=BATCH_SIZE_BUCKETS),
    "masklet_stage_latency_seconds": MetricSpec(
        "histogram", "Time a frame spends in one pipeline stage.", ("stage",),
        buckets=STAGE_LATENCY_BUCKETS, allowed_values={"stage": STAGES}),
    "masklet_end_to_end_latency_seconds": MetricSpec(
        "histogram", "Time from frame arrival to its masklet record being published.",
        buckets=END_TO_END_LATENCY_BUCKETS),
    "masklet_active_streams": MetricSpec(
        "gauge", "Streams currently being processed."),
    "masklet_active_objects": MetricSpec(
        "gauge", "Objects currently being tracked across all streams."),
    "masklet_tracker_memory_bank_bytes": MetricSpec(
        "gauge", "Bytes held by tracker memory banks."),
    "masklet_tracker_batch_size": MetricSpec(
        "histogram", "Objects per batched tracker step (one forward pass).", buckets=BATCH_SIZE_BUCKETS),
    "masklet_tracker_actors": MetricSpec(
        "gauge", "Tracker actor processes hosting objects (objects are packed onto them)."),
    "masklet_revisions_published_total": MetricSpec(
        "counter", "Records republished with a higher revision because a late prompt changed their frame."),
    "masklet_object_recoveries_total": MetricSpec(
        "counter", "Objects reopened from their snapshot after their tracker actor died."),
    "masklet_kafka_consumer_lag": MetricSpec(
        "gauge", "Messages between the committed offset and the end of the input topics."),
    "masklet_reconnects_total": MetricSpec(
        "counter", "Reconnections to a live source.", ("source_type",)),
    "masklet_deadletter_total": MetricSpec(
        "counter", "Messages sent to the dead-letter topic, by reason.", ("reason",)),
    "masklet_frames_lost_total": MetricSpec(
        "counter", "Frames missing from a stream's frame indices after the reorder window (lost upstream, "
                   "e.g. by a broker restart); reported in the next record's lost_frames_since_last."),
    "masklet_frames_redelivered_total": MetricSpec(
        "counter", "Frames read again after they were accounted for: duplicate (published before) or "
                   "late (reported lost before).", ("kind",),
        allowed_values={"kind": ("duplicate", "late")}),
    "masklet_kafka_prompt_waits_total": MetricSpec(
        "counter", "Frames that waited for their stream's prompts partition to be read up to date, by how "
                   "the wait ended.", ("outcome",),
        allowed_values={"outcome": ("caught_up", "timed_out", "unpaired")}),
    "masklet_kafka_prompt_wait_seconds": MetricSpec(
        "histogram", "How long a waiting frame waited for its stream's prompts partition.",
        buckets=STAGE_LATENCY_BUCKETS),
    "masklet_kafka_forwarded_total": MetricSpec(
        "counter", "Records forwarded to their stream's home partition (a producer with another "
                   "partitioner put them elsewhere).", ("topic",),
        allowed_values={"topic": ("frames", "prompts")}),
}


def _spec(name: str) -> MetricSpec:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from None


def _label_key(name: str, spec: MetricSpec, labels: Mapping[str, Any]) -> tuple[str, ...]:
    given, expected = set(labels), set(spec.labels)
    if given != expected:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise ValueError(
            f"metric {name!r} takes labels {list(spec.labels)}; missing {missing}, unexpected {extra}")
    values = []
    for label in spec.labels:
        raw = labels[label]
        value = raw.value if isinstance(raw, Enum) else raw
        if not isinstance(value, str) or not value:
            raise ValueError(f"label {label!r} of {name!r} must be a non-empty string, got {raw!r}")
        allowed = spec.allowed_values.get(label)
        if allowed is not None and value not in allowed:
            raise ValueError(f"label {label}={value!r} of {name!r} must be one of {list(allowed)}")
        values.append(value)
    return tuple(values)


def _check_number(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"metric {name!r} needs a number, got {value!r}")
    return float(value)


def _zero(spec: MetricSpec) -> Any:
    if spec.kind == "histogram":
        assert spec.buckets is not None
        return [0] * (len(spec.buckets) + 1) + [0.0]
    return 0.0


def _initial_series() -> dict[str, dict[tuple[str, ...], Any]]:
    """Empty series per metric, except that series whose label values are all known up front
    start at zero, so dashboards and alerts see 0 rather than "no data" before the first event."""
    series: dict[str, dict[tuple[str, ...], Any]] = {name: {} for name in METRICS}
    for name, spec in METRICS.items():
        if all(label in spec.allowed_values for label in spec.labels):
            for key in itertools.product(*(spec.allowed_values[label] for label in spec.labels)):
                series[name][key] = _zero(spec)
    return series


class Stats:
    """Thread-safe recorder for the metrics in `METRICS`; one per actor or process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # name -> label values tuple -> float (counter/gauge) or [bucket counts..., +Inf count, sum]
        self._series = _initial_series()

    def inc(self, name: str, amount: float = 1, **labels: Any) -> None:
        """Add to a counter, or to a gauge (where `amount` may be negative)."""
        spec = _spec(name)
        if spec.kind == "histogram":
            raise ValueError(f"metric {name!r} is a histogram; use observe()")
        amount = _check_number(name, amount)
        if spec.kind == "counter" and amount < 0:
            raise ValueError(f"counter {name!r} cannot decrease (amount={amount})")
        key = _label_key(name, spec, labels)
        with self._lock:
            series, key = self._series_for(name, key)
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: Any) -> None:
        spec = _spec(name)
        if spec.kind != "gauge":
            raise ValueError(f"metric {name!r} is a {spec.kind}; set() is for gauges")
        value = _check_number(name, value)
        key = _label_key(name, spec, labels)
        with self._lock:
            series, key = self._series_for(name, key)
            series[key] = value

    def observe(self, name: str, value: float, **labels: Any) -> None:
        spec = _spec(name)
        if spec.kind != "histogram":
            raise ValueError(f"metric {name!r} is a {spec.kind}; observe() is for histograms")
        value = _check_number(name, value)
        key = _label_key(name, spec, labels)
        assert spec.buckets is not None
        slot = bisect.bisect_left(spec.buckets, value)  # upper bounds are inclusive ("le")
        with self._lock:
            series, key = self._series_for(name, key)
            state = series.get(key)
            if state is None:
                state = series[key] = _zero(spec)
            state[slot] += 1
            state[-1] += value

    @contextmanager
    def timer(self, name: str, **labels: Any) -> Iterator[None]:
        """Observe the wall time of the `with` block into a seconds histogram."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(name, time.perf_counter() - start, **labels)

    def snapshot(self) -> "StatsSnapshot":
        with self._lock:
            raw = copy.deepcopy(self._series)
        return StatsSnapshot(_encode(raw))

    def _series_for(self, name: str, key: tuple[str, ...]) -> tuple[dict, tuple[str, ...]]:
        """The metric's series and the key to write under; call with the lock held."""
        series = self._series[name]
        if key in series or not key or len(series) < MAX_SERIES_PER_METRIC:
            return series, key
        return series, tuple(OVERFLOW_LABEL_VALUE for _ in key)


def _encode(raw: Mapping[str, Mapping[tuple[str, ...], Any]]) -> dict[str, list[dict]]:
    """Internal series -> the snapshot's plain-data form, sorted for stable output."""
    out: dict[str, list[dict]] = {}
    for name, series in raw.items():
        spec = METRICS[name]
        rows = []
        for key in sorted(series):
            labels = dict(zip(spec.labels, key))
            state = series[key]
            if spec.kind == "histogram":
                rows.append({"labels": labels, "bucket_counts": [int(c) for c in state[:-1]],
                             "sum": float(state[-1])})
            else:
                rows.append({"labels": labels, "value": float(state)})
        out[name] = rows
    return out


@dataclass(frozen=True)
class HistogramValue:
    buckets: tuple[float, ...]      # finite upper bounds; the last count is the +Inf slot
    bucket_counts: tuple[int, ...]  # per bucket, not cumulative
    sum: float

    @property
    def count(self) -> int:
        return sum(self.bucket_counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs ending with (inf, count), as Prometheus wants."""
        running, out = 0, []
        for bound, n in zip(list(self.buckets) + [math.inf], self.bucket_counts):
            running += n
            out.append((bound, running))
        return out


@dataclass(frozen=True)
class StatsSnapshot:
    """A point-in-time copy of one or more `Stats`: {metric name: [series rows]}.

    Counter and gauge rows are {"labels": {...}, "value": float}; histogram rows are
    {"labels": {...}, "bucket_counts": [int per bucket + one for +Inf], "sum": float}.
    """

    series: dict[str, list[dict]] = field(default_factory=lambda: _encode(_initial_series()))

    def rows(self, name: str) -> list[dict]:
        _spec(name)
        return self.series.get(name, [])

    def value(self, name: str, **labels: Any) -> float:
        """Sum of the series whose labels include `labels` (a histogram gives its count)."""
        spec = _spec(name)
        unknown = set(labels) - set(spec.labels)
        if unknown:
            raise ValueError(f"metric {name!r} has no labels {sorted(unknown)}; it takes {list(spec.labels)}")
        total = 0.0
        for row in self._matching(name, labels):
            total += sum(row["bucket_counts"]) if spec.kind == "histogram" else row["value"]
        return total

    def total(self, name: str) -> float:
        return self.value(name)

    def histogram(self, name: str, **labels: Any) -> HistogramValue:
        """Buckets, counts and sum of the histogram series matching `labels`, added together."""
        spec = _spec(name)
        if spec.kind != "histogram":
            raise ValueError(f"metric {name!r} is a {spec.kind}, not a histogram")
        assert spec.buckets is not None
        counts, total = [0] * (len(spec.buckets) + 1), 0.0
        for row in self._matching(name, labels):
            counts = [a + b for a, b in zip(counts, row["bucket_counts"])]
            total += row["sum"]
        return HistogramValue(spec.buckets, tuple(counts), total)

    def to_dict(self) -> dict[str, list[dict]]:
        return copy.deepcopy(self.series)

    def to_json(self) -> str:
        return json.dumps(self.series, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, list[dict]]) -> "StatsSnapshot":
        for name in data:
            _spec(name)
        return merge([cls({name: copy.deepcopy(list(rows)) for name, rows in data.items()})])

    def _matching(self, name: str, labels: Mapping[str, Any]) -> Iterable[dict]:
        wanted = {k: (v.value if isinstance(v, Enum) else v) for k, v in labels.items()}
        for row in self.series.get(name, []):
            if all(row["labels"].get(k) == v for k, v in wanted.items()):
                yield row


def merge(snapshots: Iterable[StatsSnapshot]) -> StatsSnapshot:
    """Combine snapshots from several actors into one.

    Counters and histograms add up. Gauges add up too: each actor reports only its own share
    (its streams, its objects, its memory-bank bytes, the lag of its own partitions).
    """
    acc = _initial_series()
    for snapshot in snapshots:
        for name, rows in snapshot.series.items():
            spec = _spec(name)
            series = acc[name]
            for row in rows:
                key = _label_key(name, spec, row["labels"])
                if spec.kind == "histogram":
                    counts = row["bucket_counts"]
                    assert spec.buckets is not None
                    if len(counts) != len(spec.buckets) + 1:
                        raise ValueError(f"histogram {name!r} row has {len(counts)} bucket counts, "
                                         f"expected {len(spec.buckets) + 1}")
                    state = series.setdefault(key, _zero(spec))
                    for i, n in enumerate(counts):
                        state[i] += int(n)
                    state[-1] += float(row["sum"])
                else:
                    series[key] = series.get(key, 0.0) + float(row["value"])
    return StatsSnapshot(_encode(acc))


def frames_unaccounted(snapshot: StatsSnapshot) -> float:
    """Frames in minus frames published minus frames dropped; 0 once a run has drained."""
    return (snapshot.total("masklet_frames_in_total")
            - snapshot.total("masklet_frames_published_total")
            - snapshot.total("masklet_frames_dropped_total"))


def frames_reconcile(snapshot: StatsSnapshot) -> bool:
    """True when frames in == frames published + frames dropped (check after a run has drained)."""
    return frames_unaccounted(snapshot) == 0
