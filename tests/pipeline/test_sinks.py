import av
import numpy as np
import pytest

from masklet.actors.messages import MaskletRecord, ObjectMask
from masklet.actors.rle import encode_mask, rle_area, rle_bbox
from masklet.actors.sinks import (
    AlphaMatteSink,
    FrameOutput,
    JsonlSink,
    MaskVideoSink,
    PreviewSink,
    SinkError,
    draw_overlay,
    logits_to_alpha,
    read_jsonl_records,
)
from masklet.actors.sources import open_source

H, W = 36, 48


def _frame(frame_idx, masks, logits=None, rgb=None):
    objects = []
    for object_id, mask in masks.items():
        rle = encode_mask(mask)
        objects.append(
            ObjectMask(object_id=object_id, rle=rle, bbox=rle_bbox(rle), area=rle_area(rle), score=1.0, iou=0.9,
                       present=bool(mask.any()))
        )
    record = MaskletRecord(stream_id="clip", frame_idx=frame_idx, pts=frame_idx / 10, width=W, height=H,
                           model="sam2.1_hiera_tiny", objects=objects)
    return FrameOutput(record=record, rgb=rgb, masks=masks, logits=logits or {})


def _random_masks(seed, n=5):
    rng = np.random.default_rng(seed)
    return [rng.random((H, W)) > 0.5 for _ in range(n)]


def _decode_gray(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]


def test_jsonl_one_record_per_frame_flushed(tmp_path):
    sink = JsonlSink(tmp_path / "out" / "masklets.jsonl")
    assert sink.open() is None
    masks = _random_masks(0, 2)
    assert sink.write(_frame(0, {})) is None
    assert sink.write(_frame(1, {1: masks[0]})) is None
    assert len(sink.path.read_bytes().splitlines()) == 2  # visible before close
    assert sink.write(_frame(2, {1: masks[1]})) is None
    assert sink.close() is None
    records = read_jsonl_records(sink.path)
    assert [r.frame_idx for r in records] == [0, 1, 2] and records[0].objects == []


def test_mask_videos_are_lossless_and_backfilled(tmp_path):
    sink = MaskVideoSink(tmp_path, fps=10)
    assert sink.open() is None
    masks = _random_masks(1)
    # object 2 appears at frame 2 and object 1 is untracked on frame 4: every video still has 5 frames
    frames = [
        _frame(0, {}),
        _frame(1, {1: masks[0]}),
        _frame(2, {1: masks[1], 2: masks[2]}),
        _frame(3, {1: masks[3], 2: masks[4]}),
        _frame(4, {2: masks[0]}),
    ]
    for frame in frames:
        assert sink.write(frame) is None
    assert sink.close() is None
    one, two = _decode_gray(sink.path_for(1)), _decode_gray(sink.path_for(2))
    assert len(one) == len(two) == 5
    empty = np.zeros((H, W), bool)
    assert all(np.array_equal(got == 255, want) for got, want in zip(one, [empty, masks[0], masks[1], masks[3], empty]))
    assert all(np.array_equal(got == 255, want) for got, want in zip(two, [empty, empty, masks[2], masks[4], masks[0]]))
    assert set(np.unique(np.concatenate(one))) <= {0, 255}


def test_alpha_mattes_are_sigmoid_of_logits_bit_exact(tmp_path):
    rng = np.random.default_rng(2)
    logits = [rng.normal(0, 8, (H, W)).astype(np.float32) for _ in range(3)]
    logits[0][0, :3] = [-1e4, 1e4, 0.0]
    sink = AlphaMatteSink(tmp_path, fps=24)
    sink.open()
    for index, plane in enumerate(logits):
        assert sink.write(_frame(index, {7: plane > 0}, logits={7: plane})) is None
    assert sink.close() is None
    decoded = _decode_gray(sink.path_for(7))
    assert len(decoded) == 3
    for got, plane in zip(decoded, logits):
        assert np.array_equal(got, logits_to_alpha(plane))
    assert decoded[0][0, :3].tolist() == [0, 255, 128]


def test_preview_has_source_frame_count_and_rate(tmp_path, video_paths):
    with open_source(video_paths[0], max_frames=3) as source:
        decoded = list(source.frames())
        fps = source.fps
    height, width = decoded[0].rgb.shape[:2]
    mask = np.zeros((height, width), bool)
    mask[100:300, 200:500] = True
    sink = PreviewSink(tmp_path / "preview.mp4", fps=fps, banner="SMOKE RUN")
    assert sink.open() is None
    for frame in decoded:
        masks = {} if frame.frame_idx == 0 else {3: mask}
        record = MaskletRecord(stream_id="c", frame_idx=frame.frame_idx, pts=frame.pts, width=width, height=height,
                               model="m", objects=[ObjectMask(object_id=3, rle=encode_mask(mask), bbox=(200, 100, 300, 200),
                                                              area=int(mask.sum()), score=1, iou=1, present=True)] if masks else [])
        assert sink.write(FrameOutput(record=record, rgb=frame.rgb, masks=masks)) is None
    assert sink.close() is None
    with av.open(str(sink.path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(fps, rel=1e-3)
    assert len(frames) == 3 and frames[0].shape == (height, width, 3)
    inside = frames[1][150:250, 250:450].astype(int).mean(axis=(0, 1))
    original = decoded[1].rgb[150:250, 250:450].astype(int).mean(axis=(0, 1))
    assert np.abs(inside - original).sum() > 30  # the overlay colour shows


def test_overlay_draws_colour_and_label():
    rgb = np.zeros((60, 80, 3), np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    out = draw_overlay(rgb, {0: mask})
    assert out[12, 12].tolist() == [115, 12, 37]  # half of palette colour 0
    assert not out[:5].any() and draw_overlay(rgb, {}).sum() == 0


def test_failures_are_reported_not_raised(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    sink = JsonlSink(blocker / "masklets.jsonl")
    error = sink.open()
    assert isinstance(error, SinkError) and error.frame_idx is None
    failed = sink.write(_frame(0, {}))
    assert isinstance(failed, SinkError) and failed.frame_idx == 0 and "not open" in str(failed)
    preview = PreviewSink(tmp_path / "p.mp4", fps=10)
    preview.open()
    assert "needs the frame's RGB" in preview.write(_frame(0, {})).reason
    assert preview.close() is None
    assert isinstance(MaskVideoSink(tmp_path, fps=0).open(), SinkError)


def test_publisher_and_decoder_processes_never_import_torch(tmp_path):
    """A publisher and a decoder do their work without torch (~1.5 CPU-seconds and ~150 MB per
    process): unpickling a segment job's sink factory, decoding a JPEG, and publishing a frame whose
    smooth masks come as low-res logits with the upsampling kernel decided by the scheduler."""
    import pickle
    import subprocess
    import sys

    from masklet.actors.masks import mask_kernel
    from masklet.actors.sinks import SegmentOutputs

    kernel = mask_kernel((64, 64), (360, 640))
    assert kernel == "fused"  # this CPU: torch's own arithmetic is reproduced without torch
    payload = pickle.dumps(SegmentOutputs(str(tmp_path), soft_masks=False, preview=False))
    code = f"""
import io, pickle, sys
import numpy as np
from PIL import Image
from masklet.actors.decoder import DecoderActor
from masklet.actors.payloads import EncodedImage, FrameMeta, ObjectResult, StreamInfo
from masklet.actors.publisher import PublisherActor
buffer = io.BytesIO(); Image.fromarray(np.zeros((360, 640, 3), np.uint8)).save(buffer, "JPEG")
statuses, rgb = DecoderActor().decode(EncodedImage(buffer.getvalue(), "image/jpeg", 640, 360))
assert statuses == (None,), statuses
publisher = PublisherActor()
factory = pickle.loads({payload!r})
info = StreamInfo("s", 640, 360, 25.0, (1,), "m", mask_kernel={kernel!r})
assert publisher.open(info, factory) == ()
ys, xs = np.mgrid[0:64, 0:64].astype(np.float32)
low = (10.0 - np.hypot(xs - 30, ys - 20)).astype(np.float32)  # a smooth blob, as real masks are
[ack] = publisher.publish_frames(((FrameMeta("s", 0, 0.0, 640, 360), (0, None), ((1, None),)),), rgb, ObjectResult(1, 0, low, 1.0, 0.9, (360, 640)))
assert ack.accepted and publisher.close("s") == ()
print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
