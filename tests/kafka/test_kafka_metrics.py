"""`masklet run` serves /metrics (issue 11.2), and the alert rules hold against what it serves.

One `masklet run` subprocess (fake model plug-in, in-process actors) consumes a stream with one
undecodable frame and one object; the test scrapes its /metrics like Prometheus would. The alert
rules in monitoring/alerts.yaml are then run by `promtool test rules` (Debian's prometheus
package; CI installs it) over series that carry exactly the names and labels of that scrape.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from masklet.pipeline.kafka.codec import encode_jpeg, frame_headers
from masklet.pipeline.kafka.prompts import build_prompt, publish_prompt
from tests.kafka.test_kafka_run import send_raw

REPO_ROOT = Path(__file__).resolve().parents[2]
ALERTS = REPO_ROOT / "monitoring" / "alerts.yaml"
FRAMES = 12


class RunProcess:
    """`masklet run` with --metrics-port 0; `url` is read from its stderr."""

    def __init__(self, settings, group: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        for name in ("frames", "prompts", "masklets", "deadletter"):
            env[f"MASKLET_KAFKA__TOPICS__{name.upper()}"] = getattr(settings.topics, name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "masklet.deploy.kafka_cli", "run", "--model", "fake",
             "--model-factory", "tests.pipeline.fakes:build_fake_model", "--checkpoint", "random",
             "--image-size", "64", "--device", "cpu", "--backend", "inprocess", "--metrics-port", "0",
             "--bootstrap-servers", settings.bootstrap_servers, "--group-id", group],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            found = re.search(r"metrics on (http://\S+/metrics)", line)
            if found:
                self.url = found.group(1)

    def wait_for_url(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while self.url is None:
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, f"no metrics URL printed:\n{''.join(self.lines)}"
            time.sleep(0.05)
        return self.url

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def scrape(url: str) -> dict[str, list]:
    """family name -> samples, as Prometheus would store them (name, labels, value)."""
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample(families: dict, name: str, **labels) -> float:
    return sum(s.value for samples in families.values() for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def scraped(broker, tmp_path_factory):
    """Scrapes of a `masklet run` that published FRAMES - 1 records and dead-lettered one frame."""
    from masklet.pipeline.config import KafkaSettings, KafkaTopics

    topics = KafkaTopics(frames="metrics.frames", prompts="metrics.prompts", masklets="metrics.masklets",
                         deadletter="metrics.deadletter")
    broker.create_topics([topics.frames, topics.prompts, topics.masklets, topics.deadletter])
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topics=topics)
    run = RunProcess(settings, "metrics")
    try:
        url = run.wait_for_url()
        rgb = np.full((48, 64, 3), 90, np.uint8)
        rgb[10:30, 20:44] = (200, 40, 40)
        assert publish_prompt(build_prompt("cam", 1, frame_idx=0, box=(20, 10, 44, 30)), settings).complete
        for i in range(FRAMES):
            value = b"\xff\xd8\xff\xe0garbage" if i == 5 else encode_jpeg(rgb)
            send_raw(settings, topics.frames, value, b"cam", frame_headers(i, i / 10, 64, 48))
        deadline, families = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            families = scrape(url)
            if sample(families, "masklet_frames_published_total") >= FRAMES - 1 and \
                    sample(families, "masklet_deadletter_total") >= 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"metrics never showed the run's work: {families}\n{''.join(run.lines)[-3000:]}")
    finally:
        code = run.stop()
    assert code == 0, "".join(run.lines)[-3000:]
    return families


def test_masklet_run_serves_lag_dead_letters_stage_latency_and_frame_counts(scraped):
    assert sample(scraped, "masklet_frames_in_total", source_type="kafka") == FRAMES
    assert sample(scraped, "masklet_frames_published_total") == FRAMES - 1
    assert sample(scraped, "masklet_frames_dropped_total", reason="undecodable_frame") == 1
    assert sample(scraped, "masklet_deadletter_total", reason="undecodable_frame") == 1
    assert "masklet_kafka_consumer_lag" in scraped  # a gauge: 0 once drained, present either way
    stages = {s.labels["stage"] for s in scraped["masklet_stage_latency_seconds"]
              if s.name.endswith("_count") and s.value > 0}
    assert {"encode", "track", "publish"} <= stages, stages  # all actors' stats merged into one scrape
    assert sample(scraped, "masklet_end_to_end_latency_seconds_count") == FRAMES - 1


# -- alert rules ------------------------------------------------------------------------------


def render(template: str, labels: dict, value: float) -> str:
    """The subset of Prometheus' alert templating that alerts.yaml uses ($labels, $value, humanize*)."""
    def humanize(v: float) -> str:
        for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
            if abs(v) >= factor or factor == 1:
                return f"{v / factor:.4g}{prefix}"
        return f"{v:.4g}"

    filters = {"humanize": humanize, "humanizePercentage": lambda v: f"{v * 100:.4g}%",
               "humanizeDuration": lambda v: f"{v:.4g}s", None: lambda v: f"{v:g}"}

    def one(match: re.Match) -> str:
        expr = match.group(1).strip()
        if expr.startswith("$labels."):
            return labels[expr.removeprefix("$labels.")]
        name = expr.split("|", 1)[1].strip() if "|" in expr else None
        assert expr.startswith("$value") and name in filters, f"template {expr!r} is not rendered by this test"
        return filters[name](value)

    return re.sub(r"{{(.*?)}}", one, template)


def _series(name: str, labels: dict) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{body}}}"


def _labels_of(scraped: dict, family: str, name: str) -> list[dict]:
    return [dict(s.labels) for s in scraped.get(family, []) if s.name == name]


def test_alert_rules_fire_on_series_shaped_like_the_scrape(scraped, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (Debian's package; .ci/run installs it)"
    job = {"job": "masklet-run", "instance": "127.0.0.1:9464"}
    reason = _labels_of(scraped, "masklet_deadletter", "masklet_deadletter_total")[0]["reason"]
    buckets = [labels["le"] for labels in _labels_of(scraped, "masklet_end_to_end_latency_seconds",
                                                      "masklet_end_to_end_latency_seconds_bucket")]
    assert "+Inf" in buckets and reason == "undecodable_frame"
    series = [
        # a stalled run: nothing published for 10 minutes while a stream is open
        {"series": _series("masklet_frames_published_total", job), "values": "100x20"},
        {"series": _series("masklet_active_streams", job), "values": "1x20"},
        # lag that keeps rising past 1000
        {"series": _series("masklet_kafka_consumer_lag", job), "values": "1000+100x20"},
        # 10% of the frames dropped
        {"series": _series("masklet_frames_in_total", {**job, "source_type": "kafka"}), "values": "0+100x20"},
        {"series": _series("masklet_frames_dropped_total", {**job, "reason": "queue_full"}), "values": "0+10x20"},
        # dead letters, with the reason label the run really uses
        {"series": _series("masklet_deadletter_total", {**job, "reason": reason}), "values": "0 0 0 3x17"},
    ]
    # every record took between 2.5 and 5 s: p95 above the 2 s threshold
    for le in buckets:
        slow = le in ("5.0", "10.0", "30.0", "60.0", "+Inf")
        series.append({"series": _series("masklet_end_to_end_latency_seconds_bucket", {**job, "le": le}),
                       "values": "0+10x20" if slow else "0x20"})
    # alert -> (when it must be firing, its labels, its $value then)
    alerts = {
        "MaskletStreamStalled": (10, {}, 0.0),
        "MaskletConsumerLagRising": (15, {}, 100 / 60),   # deriv: +100 messages a minute
        "MaskletFramesDropped": (10, {}, 0.1),
        "MaskletDeadLetters": (5, {"reason": reason}, 3.0),
        "MaskletEndToEndLatencyHigh": (15, {}, 4.875),    # p95 inside the (2.5, 5] bucket
    }
    rules = {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    expectations = []
    for name, (minute, labels, value) in alerts.items():
        labels = {"job": job["job"], **labels}
        annotations = {k: render(v, labels, value) for k, v in rules[name].get("annotations", {}).items()}
        expectations.append({"eval_time": f"{minute}m", "alertname": name,
                             "exp_alerts": [{"exp_labels": {**labels, **rules[name]["labels"]},
                                             "exp_annotations": annotations}]})
        expectations.append({"eval_time": "1m", "alertname": name, "exp_alerts": []})  # not yet: `for:` / no data
    test = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": expectations}]}
    path = tmp_path / "alerts_test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # ...and a healthy run fires none of them: the series as scraped, flat over 20 minutes.
    flowing = ("masklet_frames_in_total", "masklet_frames_encoded_total", "masklet_frames_published_total")
    healthy = [{"series": _series(s.name, {**job, **s.labels}),
                "values": f"{s.value:g}+100x20" if s.name in flowing else f"{s.value:g}x20"}
               for samples in scraped.values() for s in samples
               if s.name.startswith("masklet_") and not s.name.endswith(("_created", "_sum", "_count"))]
    names = list(rules)
    test = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": healthy,
                       "alert_rule_test": [{"eval_time": "20m", "alertname": n, "exp_alerts": []} for n in names]}]}
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
