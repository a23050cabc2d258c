"""`masklet ingest` and `masklet prompt` against the embedded broker, plus reconnect behaviour."""
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from masklet.monitoring.stats import Stats
from masklet.pipeline.kafka.codec import decode_frame, parse_prompt
from masklet.pipeline.kafka.ingest import ReconnectPolicy, ingest
from masklet.actors.sources import DecodedFrame, SourceError, open_source

REPO_ROOT = Path(__file__).resolve().parents[2]
FRAMES = 20


def test_ingest_real_clip_round_trips_in_order_with_headers(kafka_settings, consume_records, videos_dir):
    clip = videos_dir / "01_dog.mp4"
    report = ingest(str(clip), "dog", kafka_settings, max_frames=FRAMES)
    assert report.frames_sent == FRAMES and not report.gave_up
    assert report.delivery.complete and report.delivery.acked == FRAMES

    records = consume_records(kafka_settings, kafka_settings.topics.frames, FRAMES)
    assert len(records) == FRAMES
    with open_source(str(clip), max_frames=FRAMES) as source:
        originals = list(source.frames())
    for expected_idx, (record, original) in enumerate(zip(records, originals)):
        headers = dict(record.headers)
        assert record.key == b"dog"
        assert headers["schema"] == b"frame/v1" and headers["content_type"] == b"image/jpeg"
        assert int(headers["frame_idx"]) == expected_idx
        assert float(headers["pts"]) == pytest.approx(original.pts)
        assert (headers["width"], headers["height"]) == (b"1280", b"720")
        stream_id, meta, rgb = decode_frame(record.key, record.value, record.headers, max_pixels=1280 * 720)
        assert (stream_id, meta.frame_idx) == ("dog", expected_idx)
        # JPEG at quality 90 of the very frame that was decoded: close, not bit-exact.
        assert np.abs(rgb.astype(int) - original.rgb.astype(int)).mean() < 4.0


def test_prompt_command_publishes_prompt_v1(kafka_settings, consume_records):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    common = ["--bootstrap-servers", kafka_settings.bootstrap_servers]
    env["MASKLET_KAFKA__TOPICS__PROMPTS"] = kafka_settings.topics.prompts
    done = subprocess.run([sys.executable, "-m", "masklet.deploy.kafka_cli", "prompt", "--stream", "dog", "--object", "2",
                           "--box", "10,20,300,400", "--frame", "7", *common],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    refused = subprocess.run([sys.executable, "-m", "masklet.deploy.kafka_cli", "prompt", "--stream", "dog", "--object", "2",
                              "--box", "300,20,10,400", *common],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "x0 < x1" in refused.stderr

    [record] = consume_records(kafka_settings, kafka_settings.topics.prompts, 1)
    prompt = parse_prompt(record.value, {"dog": (1280, 720)})
    assert record.key == b"dog"
    assert (prompt.object_id, prompt.frame_idx, prompt.action, prompt.box) == (2, 7, "add", (10, 20, 300, 400))


class _FlakySource:
    """A stand-in for an RTSP camera: each connection yields a few frames, then drops."""

    def __init__(self, script):
        self.script = script  # per connection: number of frames, or an exception to raise on open
        self.connections = 0

    @contextmanager
    def open(self, uri, *, max_pixels, max_frames):
        step = self.script[min(self.connections, len(self.script) - 1)]
        self.connections += 1
        if isinstance(step, Exception):
            raise step
        source = type("S", (), {"fps": 10.0})()
        count = step

        def frames():
            for idx in range(count):
                if max_frames is not None and idx >= max_frames:
                    return  # as open_source does: max_frames ends the connection cleanly
                yield DecodedFrame(idx, idx / 10.0, np.full((48, 64, 3), idx, np.uint8), (64, 48))
            raise SourceError(uri, "connection reset by peer")

        source.frames = frames
        yield source


def test_live_source_reconnects_and_keeps_numbering(kafka_settings, consume_records):
    flaky = _FlakySource([3, SourceError("rtsp://cam", "timeout"), 4])
    stats, slept = Stats(), []
    report = ingest("rtsp://cam/1", "cam", kafka_settings, max_frames=7, open_fn=flaky.open,
                    sleep=slept.append, stats=stats)
    assert report.frames_sent == 7 and not report.gave_up
    assert report.reconnects == 2 and slept == [0.5, 1.0]  # the failing reconnect doubles the backoff
    assert stats.snapshot().value("masklet_reconnects_total", source_type="rtsp") == 2

    records = consume_records(kafka_settings, kafka_settings.topics.frames, 7)
    indices = [int(dict(r.headers)["frame_idx"]) for r in records]
    pts = [float(dict(r.headers)["pts"]) for r in records]
    assert indices == list(range(7))
    assert all(b > a for a, b in zip(pts, pts[1:]))  # pts stays monotonic across reconnects


def test_live_source_gives_up_after_bounded_attempts(kafka_settings):
    flaky = _FlakySource([2, SourceError("rtsp://cam", "connection refused")])
    slept = []
    report = ingest("rtsp://cam/1", "cam", kafka_settings, open_fn=flaky.open, sleep=slept.append,
                    reconnect=ReconnectPolicy(max_reconnects=3, initial_backoff_s=0.1, max_backoff_s=0.3))
    assert report.gave_up and "3 reconnects failed" in report.give_up_reason
    assert report.frames_sent == 2 and report.reconnects == 3
    assert slept == [0.1, 0.2, 0.3]
    assert flaky.connections == 4


def test_unreadable_file_is_an_error_not_a_reconnect(kafka_settings, tmp_path):
    with pytest.raises(SourceError):
        ingest(str(tmp_path / "missing.mp4"), "x", kafka_settings)
