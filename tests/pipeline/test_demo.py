"""`make demo` offline: one line says so, then a labelled smoke run on a generated clip completes, then
the clip goes through the live path (embedded Kafka broker, `masklet run`, a prompt, records read back)."""
from __future__ import annotations

import re
import socket

import av

import masklet.model.checkpoints as checkpoints
from masklet.deploy import demo, demo_live
from masklet.actors.sinks import read_jsonl_records


def _closed_port() -> int:
    """A local port nothing listens on: bind to get a free one, then close it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_demo_runs_a_labelled_smoke_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASKLET_CHECKPOINT_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MASKLET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(demo.INPUT_ENV, raising=False)
    monkeypatch.setattr(checkpoints, "_BACKOFF_BASE_SECONDS", 0.0)
    out = tmp_path / "demo-out"

    assert demo.main(["--out", str(out)]) == 0

    captured = capsys.readouterr()
    text = captured.out + captured.err
    offline = [line for line in text.splitlines() if "could not be downloaded" in line]
    assert len(offline) == 1 and offline[0].startswith("masklet demo: offline:"), offline
    assert "127.0.0.1" in offline[0]  # the line names where it tried
    assert "SMOKE RUN" in captured.out and "MEANINGLESS" in captured.out
    assert "--checkpoint /path/to/sam2.1_hiera_tiny.pt" in captured.out

    clip = out / demo.CLIP_NAME
    with av.open(str(clip)) as container:
        assert sum(1 for _ in container.decode(video=0)) == demo.CLIP_FRAMES
    results = out / "smoke-run" / clip.stem
    records = read_jsonl_records(results / "masklets.jsonl")
    assert [r.frame_idx for r in records] == list(range(demo.CLIP_FRAMES))
    assert all(len(r.objects) == 1 for r in records)  # clicked at CLICK_FRAME, propagated both ways
    with av.open(str(results / "preview.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == demo.CLIP_FRAMES
    assert "MEANINGLESS" in (out / "smoke-run" / "SMOKE_RUN.txt").read_text()
    assert str(results) in captured.out  # it ends by saying where the outputs are

    # The live path: the prompt sent before the first frame applies from the frame it names.
    assert "LIVE PATH" in captured.out and "RANDOM WEIGHTS here too" in captured.out
    live = read_jsonl_records(out / "smoke-run" / "live" / "masklets.jsonl")
    assert live and all(r.stream_id == "demo-cam" for r in live)
    sent = [line for line in captured.out.splitlines() if "frames sent" in line]
    assert sent and sent[0].startswith(f"masklet demo: {demo_live.LIVE_FRAMES} frames sent, {len(live)} masklet records")
    published, dropped = len(live), sum(r.dropped_frames_since_last for r in live)
    assert published + dropped == demo_live.LIVE_FRAMES  # every frame published or reported dropped
    assert all(any(o.object_id == 1 for o in r.objects) for r in live if r.frame_idx >= demo.CLICK_FRAME)
    assert re.search(r"metrics \(while the demo runs\): http://127\.0\.0\.1:\d+/metrics", captured.out)
    assert "http://127.0.0.1:8000/" in captured.out and "MASKLET_API_TOKEN=$(" in captured.out
