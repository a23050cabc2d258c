"""Stats objects, their merge, the Prometheus exporter, and the dashboard/alert files that name metrics."""
import json
import pickle
import re
import sys
import threading
import types
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from masklet.monitoring.exporter import CONTENT_TYPE_LATEST, gather_actor_snapshots, render_latest, start_metrics_server
from masklet.monitoring.stats import (
    METRICS,
    STAGES,
    Stats,
    StatsSnapshot,
    frames_reconcile,
    frames_unaccounted,
    merge,
)

MONITORING_DIR = Path(__file__).resolve().parents[2] / "monitoring"
FORBIDDEN_LABELS = {"stream_id", "frame_idx", "frame_id", "object_id", "obj_id", "pts"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _metric_names_in(text: str) -> set[str]:
    names = set()
    for name in re.findall(r"\bmasklet_[a-z0-9_]+", text):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in METRICS:
                name = name[: -len(suffix)]
        names.add(name)
    return names


# --- catalogue naming -----------------------------------------------------------------------

def test_catalogue_names_follow_prometheus_practice():
    for name, spec in METRICS.items():
        assert name.startswith("masklet_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert (spec.kind == "counter") == name.endswith("_total"), name
        assert not FORBIDDEN_LABELS & set(spec.labels), (name, spec.labels)
        assert spec.help.strip(), name
        if spec.kind == "histogram":
            assert list(spec.buckets) == sorted(spec.buckets) and len(spec.buckets) >= 2, name
        else:
            assert spec.buckets is None, name
        # base units only: no milliseconds, kilobytes and the like
        assert not re.search(r"_(ms|milliseconds|us|kb|mb|gb|kib|mib|gib|percent)(_|$)", name), name
    assert METRICS["masklet_stage_latency_seconds"].labels == ("stage",)
    assert METRICS["masklet_end_to_end_latency_seconds"].kind == "histogram"
    assert METRICS["masklet_tracker_memory_bank_bytes"].kind == "gauge"
    assert METRICS["masklet_encoder_batch_size"].buckets == (1, 2, 4, 8, 16, 32)


def test_required_metrics_are_all_in_the_catalogue():
    required = {
        "masklet_frames_in_total", "masklet_frames_dropped_total", "masklet_frames_encoded_total",
        "masklet_frames_published_total", "masklet_encoder_batch_size", "masklet_stage_latency_seconds",
        "masklet_end_to_end_latency_seconds", "masklet_active_streams", "masklet_active_objects",
        "masklet_tracker_memory_bank_bytes", "masklet_kafka_consumer_lag", "masklet_reconnects_total",
        "masklet_deadletter_total",
        # live path (issues 11 and 12)
        "masklet_frames_lost_total", "masklet_frames_redelivered_total", "masklet_kafka_prompt_waits_total",
        "masklet_kafka_prompt_wait_seconds", "masklet_kafka_forwarded_total", "masklet_revisions_published_total",
        # objects as rows: trackers host many objects
        "masklet_tracker_batch_size", "masklet_tracker_actors", "masklet_object_recoveries_total",
    }
    assert required == set(METRICS)


# --- Stats ----------------------------------------------------------------------------------

def test_counters_gauges_and_histograms_record_values():
    stats = Stats()
    stats.inc("masklet_frames_in_total", source_type="rtsp")
    stats.inc("masklet_frames_in_total", 4, source_type="rtsp")
    stats.inc("masklet_frames_in_total", source_type="file")
    stats.set("masklet_active_streams", 3)
    stats.inc("masklet_active_streams", -1)
    for size in (1, 3, 8, 40):
        stats.observe("masklet_encoder_batch_size", size)
    snap = stats.snapshot()

    assert snap.value("masklet_frames_in_total", source_type="rtsp") == 5
    assert snap.total("masklet_frames_in_total") == 6
    assert snap.value("masklet_active_streams") == 2
    batch = snap.histogram("masklet_encoder_batch_size")
    assert batch.count == 4 and batch.sum == 52
    # le=1 holds 1; le=4 holds 3; le=8 holds 8 (inclusive bound); 40 only in +Inf
    assert batch.cumulative() == [(1, 1), (2, 1), (4, 2), (8, 3), (16, 3), (32, 3), (float("inf"), 4)]


def test_timer_observes_elapsed_seconds():
    stats = Stats()
    with stats.timer("masklet_stage_latency_seconds", stage="decode"):
        pass
    hist = stats.snapshot().histogram("masklet_stage_latency_seconds", stage="decode")
    assert hist.count == 1 and 0 <= hist.sum < 1


def test_known_stage_series_start_at_zero():
    snap = Stats().snapshot()
    stages = {row["labels"]["stage"] for row in snap.rows("masklet_stage_latency_seconds")}
    assert stages == set(STAGES)
    assert snap.rows("masklet_active_streams") == [{"labels": {}, "value": 0.0}]


@pytest.mark.parametrize("call, message", [
    (lambda s: s.inc("masklet_frames_total"), "unknown metric"),
    (lambda s: s.inc("masklet_frames_in_total"), "missing ['source_type']"),
    (lambda s: s.inc("masklet_frames_in_total", source_type="file", stream_id="cam1"), "unexpected ['stream_id']"),
    (lambda s: s.inc("masklet_frames_encoded_total", -1), "cannot decrease"),
    (lambda s: s.inc("masklet_frames_dropped_total", reason=3), "non-empty string"),
    (lambda s: s.observe("masklet_stage_latency_seconds", 0.1, stage="inference"), "must be one of"),
    (lambda s: s.observe("masklet_frames_encoded_total", 1), "observe() is for histograms"),
    (lambda s: s.set("masklet_frames_encoded_total", 1), "set() is for gauges"),
    (lambda s: s.inc("masklet_encoder_batch_size"), "use observe()"),
    (lambda s: s.set("masklet_active_objects", float("nan")), "needs a number"),
])
def test_invalid_use_raises_clear_value_error(call, message):
    with pytest.raises(ValueError) as excinfo:
        call(Stats())
    assert message in str(excinfo.value)


def test_label_cardinality_is_capped():
    from masklet.monitoring.stats import MAX_SERIES_PER_METRIC, OVERFLOW_LABEL_VALUE
    stats = Stats()
    for i in range(MAX_SERIES_PER_METRIC + 10):
        stats.inc("masklet_deadletter_total", reason=f"reason-{i}")
    snap = stats.snapshot()
    assert len(snap.rows("masklet_deadletter_total")) == MAX_SERIES_PER_METRIC + 1
    assert snap.value("masklet_deadletter_total", reason=OVERFLOW_LABEL_VALUE) == 10
    assert snap.total("masklet_deadletter_total") == MAX_SERIES_PER_METRIC + 10


def test_concurrent_increments_are_not_lost():
    stats = Stats()

    def work():
        for _ in range(2000):
            stats.inc("masklet_frames_encoded_total")
            stats.observe("masklet_end_to_end_latency_seconds", 0.2)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap.total("masklet_frames_encoded_total") == 8000
    assert snap.histogram("masklet_end_to_end_latency_seconds").count == 8000


# --- snapshots and merge ----------------------------------------------------------------------

def test_snapshot_is_a_detached_frozen_plain_value():
    stats = Stats()
    stats.inc("masklet_frames_published_total", 2)
    snap = stats.snapshot()
    stats.inc("masklet_frames_published_total", 5)
    assert snap.total("masklet_frames_published_total") == 2
    with pytest.raises(AttributeError):
        snap.series = {}  # type: ignore[misc]
    round_tripped = StatsSnapshot.from_dict(json.loads(snap.to_json()))
    assert round_tripped == snap
    assert pickle.loads(pickle.dumps(snap)) == snap


def test_merge_sums_counters_histograms_and_gauges():
    decoder, encoder, tracker_a, tracker_b = Stats(), Stats(), Stats(), Stats()
    decoder.inc("masklet_frames_in_total", 10, source_type="file")
    decoder.inc("masklet_frames_dropped_total", 2, reason="queue_full")
    decoder.observe("masklet_stage_latency_seconds", 0.004, stage="decode")
    encoder.inc("masklet_frames_encoded_total", 8)
    encoder.observe("masklet_stage_latency_seconds", 0.03, stage="encode")
    encoder.observe("masklet_stage_latency_seconds", 0.002, stage="decode")
    for tracker, nbytes in ((tracker_a, 1000), (tracker_b, 2500)):
        tracker.set("masklet_active_objects", 1)
        tracker.set("masklet_tracker_memory_bank_bytes", nbytes)

    merged = merge(s.snapshot() for s in (decoder, encoder, tracker_a, tracker_b))

    assert merged.value("masklet_frames_in_total", source_type="file") == 10
    assert merged.value("masklet_frames_dropped_total", reason="queue_full") == 2
    assert merged.total("masklet_frames_encoded_total") == 8
    assert merged.total("masklet_active_objects") == 2
    assert merged.total("masklet_tracker_memory_bank_bytes") == 3500
    decode = merged.histogram("masklet_stage_latency_seconds", stage="decode")
    assert decode.count == 2 and decode.sum == pytest.approx(0.006)
    assert merged.histogram("masklet_stage_latency_seconds").count == 3
    # merging is associative with the empty snapshot as identity
    assert merge([merged, merge([])]) == merged


def test_value_rejects_labels_the_metric_does_not_have():
    with pytest.raises(ValueError, match="no labels"):
        Stats().snapshot().value("masklet_frames_in_total", stream_id="cam1")


def test_frames_reconcile():
    source, publisher = Stats(), Stats()
    source.inc("masklet_frames_in_total", 100, source_type="rtsp")
    source.inc("masklet_frames_dropped_total", 7, reason="drop_oldest")
    source.inc("masklet_frames_dropped_total", 3, reason="undecodable")
    publisher.inc("masklet_frames_published_total", 89)
    incomplete = merge([source.snapshot(), publisher.snapshot()])
    assert not frames_reconcile(incomplete)
    assert frames_unaccounted(incomplete) == 1

    publisher.inc("masklet_frames_published_total")
    assert frames_reconcile(merge([source.snapshot(), publisher.snapshot()]))
    assert frames_reconcile(Stats().snapshot())


# --- exporter -------------------------------------------------------------------------------

def _populated_snapshot() -> StatsSnapshot:
    stats = Stats()
    stats.inc("masklet_frames_in_total", 12, source_type="kafka")
    stats.inc("masklet_frames_published_total", 12)
    stats.inc("masklet_reconnects_total", source_type="rtsp")
    stats.set("masklet_kafka_consumer_lag", 42)
    stats.observe("masklet_encoder_batch_size", 4)
    stats.observe("masklet_encoder_batch_size", 16)
    stats.observe("masklet_stage_latency_seconds", 0.02, stage="track")
    return stats.snapshot()


def test_render_latest_parses_and_carries_catalogue_types_and_help():
    text = render_latest(_populated_snapshot()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, spec in METRICS.items():
        family = families[name[: -len("_total")] if spec.kind == "counter" else name]
        assert family.type == spec.kind
        assert family.documentation == spec.help

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("masklet_frames_in_total", (("source_type", "kafka"),))] == 12
    assert samples[("masklet_kafka_consumer_lag", ())] == 42
    assert samples[("masklet_encoder_batch_size_bucket", (("le", "4.0"),))] == 1
    assert samples[("masklet_encoder_batch_size_bucket", (("le", "+Inf"),))] == 2
    assert samples[("masklet_encoder_batch_size_count", ())] == 2
    assert samples[("masklet_encoder_batch_size_sum", ())] == 20
    assert samples[("masklet_stage_latency_seconds_count", (("stage", "track"),))] == 1
    assert samples[("masklet_stage_latency_seconds_count", (("stage", "decode"),))] == 0
    assert "text/plain" in CONTENT_TYPE_LATEST


def test_metrics_server_binds_loopback_and_serves_live_snapshots():
    stats = Stats()
    server = start_metrics_server(stats.snapshot, port=0)
    try:
        assert server.host == "127.0.0.1"
        stats.inc("masklet_frames_encoded_total", 3)
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
    finally:
        server.close()
    values = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}
    assert values["masklet_frames_encoded_total"] == 3
    # only Masklet's metrics: no process_/python_gc_ collectors leak in
    assert all(name.startswith("masklet_") for name in values)


def test_gather_actor_snapshots_merges_ready_actors_and_skips_failed_ones(monkeypatch):
    class RayError(Exception):
        pass

    class Ref:
        def __init__(self, value):
            self.value = value

    class FakeRay(types.SimpleNamespace):
        exceptions = types.SimpleNamespace(RayError=RayError)

        def wait(self, refs, num_returns, timeout):
            assert timeout == 1.5
            return [r for r in refs if r.value != "slow"], [r for r in refs if r.value == "slow"]

        def get(self, ref):
            if isinstance(ref.value, Exception):
                raise ref.value
            return ref.value

    class Handle:
        def __init__(self, value):
            self.stats_snapshot = types.SimpleNamespace(remote=lambda: Ref(value))

    one, two = Stats(), Stats()
    one.inc("masklet_frames_in_total", 3, source_type="file")
    two.inc("masklet_frames_in_total", 4, source_type="file")
    monkeypatch.setitem(sys.modules, "ray", FakeRay())
    handles = [Handle(one.snapshot()), Handle(two.snapshot().to_dict()), Handle(RayError("dead")), Handle("slow")]
    merged = gather_actor_snapshots(handles, timeout_s=1.5)
    assert merged.total("masklet_frames_in_total") == 7
    assert gather_actor_snapshots([], timeout_s=1.5) == merge([])


# --- dashboard and alert rules ---------------------------------------------------------------

def test_grafana_dashboard_covers_every_metric_with_templated_datasource():
    dashboard = json.loads((MONITORING_DIR / "grafana" / "masklet.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    used = set().union(*(_metric_names_in(e) for e in exprs))
    assert used == set(METRICS), f"missing from dashboard: {set(METRICS) - used}; unknown: {used - set(METRICS)}"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            for counter in (n for n in _metric_names_in(target["expr"]) if METRICS[n].kind == "counter"):
                # counters appear only through rate()/increase() or as a reconcile difference
                assert re.search(rf"(rate|increase)\({counter}\b", target["expr"]) or "frames_in" in target["expr"]
    kinds = {p["type"] for p in panels}
    assert {"timeseries", "heatmap", "stat"} <= kinds
    assert any("histogram_quantile" in e for e in exprs)


def test_alert_rules_reference_real_metrics_and_cover_required_alerts():
    rules_file = yaml.safe_load((MONITORING_DIR / "alerts.yaml").read_text())
    rules = [rule for group in rules_file["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"MaskletStreamStalled", "MaskletConsumerLagRising", "MaskletFramesDropped", "MaskletDeadLetters"} <= names
    for rule in rules:
        referenced = _metric_names_in(rule["expr"])
        assert referenced, rule["alert"]
        assert referenced <= set(METRICS), (rule["alert"], referenced - set(METRICS))
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"]
    stalled = next(r for r in rules if r["alert"] == "MaskletStreamStalled")
    assert stalled["for"] == "2m"
    assert {"masklet_frames_published_total", "masklet_active_streams"} <= _metric_names_in(stalled["expr"])
