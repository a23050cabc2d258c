"""step_many: objects of several streams in one forward pass give exactly the one-by-one results."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import masklet.model.batched_step as batched_step
from masklet.model import MaskResult, Prompt, StepRequest, StepRequestError, build_model, step_many
from oracle import read_clip, sharpen_random_weights

S = 256  # the smallest size that batches (batched_step.MIN_BATCHED_IMAGE_SIZE)
TICKS = 24  # > num_maskmem frames for every object, >= 16 for SAM 2.1 pointer encoding for the first ones


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("sam2.1_hiera_tiny", checkpoint=None, image_size=S)
    sharpen_random_weights(m)  # memory must matter, or equality would prove little
    return m


@pytest.fixture(scope="module")
def streams(model, video_paths):
    """Two streams of different sizes: (video_size, embeddings, first global tick)."""
    a = read_clip(video_paths[0], TICKS)  # 320x180
    b = read_clip(video_paths[1], TICKS - 5, size=(240, 160))
    return {
        "a": ((180, 320), model.encode(np.stack(a)), 0),
        "b": ((160, 240), model.encode(np.stack(b)), 5),  # starts 5 ticks later: its own frame numbers
    }


def _ellipse(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((xx - w * 0.45) / (w * 0.2)) ** 2 + ((yy - h * 0.5) / (h * 0.25)) ** 2 <= 1.0


# Objects start at different frames and get later prompts, so memory fill levels (and so the groups
# step_many forms) differ from tick to tick. object -> (stream, num_frames, {stream frame: prompt})
OBJECTS = {
    "a1": ("a", None, {0: Prompt(points=[[160, 90]], labels=[1])}),
    "a2": ("a", None, {2: Prompt(box=[100, 40, 230, 150])}),
    "a3": ("a", None, {0: Prompt(points=[[60, 140]], labels=[1]), 6: Prompt(points=[[70, 130]], labels=[1])}),
    "a4": ("a", None, {1: Prompt(points=[[260, 60]], labels=[1])}),
    "b1": ("b", TICKS - 5, {0: Prompt(points=[[120, 80], [30, 20]], labels=[1, 0])}),
    "b2": ("b", None, {3: Prompt(mask=_ellipse(160, 240))}),
}
REFINES = {("a2", 10): Prompt(points=[[170, 100]], labels=[0])}  # a correction between steps


def run(model, streams, batched: bool):
    """Every object through every tick; returns (results per object, trackers)."""
    trackers = {
        name: model.new_tracker(streams[stream][0], num_frames=num_frames)
        for name, (stream, num_frames, _) in OBJECTS.items()
    }
    results = {name: {} for name in OBJECTS}
    for tick in range(TICKS):
        requests, names = [], []
        for name, (stream, _, prompts) in OBJECTS.items():
            _, embeddings, first_tick = streams[stream]
            frame = tick - first_tick
            if frame < 0 or frame < min(prompts):
                continue
            requests.append(StepRequest(trackers[name], frame, embeddings[frame], prompts.get(frame)))
            names.append(name)
        outs = model.step_many(requests) if batched else [r.tracker.step(r.frame_idx, r.embedding, r.prompt) for r in requests]
        for name, request, out in zip(names, requests, outs):
            results[name][request.frame_idx] = out
            fix = REFINES.get((name, request.frame_idx))
            if fix is not None:
                results[name][request.frame_idx] = trackers[name].refine(request.embedding, fix)
    return results, trackers


def _tensors(state, prefix=""):
    """Flatten a tracker state_dict into {path: tensor or value}."""
    if isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _tensors(v, f"{prefix}[{i}]")
    else:
        yield prefix, state


def test_step_many_equals_one_by_one_bit_for_bit(model, streams, monkeypatch):
    batch_sizes = []
    real = batched_step._track_batch

    def counting(m, items, inputs):
        batch_sizes.append(len(items))
        return real(m, items, inputs)

    one_by_one, trackers_1 = run(model, streams, batched=False)
    monkeypatch.setattr(batched_step, "_track_batch", counting)
    many, trackers_n = run(model, streams, batched=True)
    print("forward passes by batch size:", {b: batch_sizes.count(b) for b in sorted(set(batch_sizes))})
    assert max(batch_sizes) >= 3, "no group of 3+ objects formed: the test would not exercise batching"
    assert 1 in batch_sizes and 2 in batch_sizes, "groups never differed: fill levels did not diverge"

    worst = 0.0
    for name in OBJECTS:
        assert sorted(many[name]) == sorted(one_by_one[name])
        assert len(many[name]) > 7, f"{name}: must run past the memory window"
        for frame, ref in one_by_one[name].items():
            got = many[name][frame]
            diff = (got.low_res_logits - ref.low_res_logits).abs().max().item()
            worst = max(worst, diff)
            assert diff == 0.0, f"{name} frame {frame}: max|d logit| = {diff:.3g} (ref std {ref.low_res_logits.std():.3g})"
            assert (got.score, got.iou, got.is_conditioning) == (ref.score, ref.iou, ref.is_conditioning), (
                f"{name} frame {frame}: ours score/iou {got.score}/{got.iou}, one-by-one {ref.score}/{ref.iou}")
        # Stored memories, object pointers, presence logits: every tensor of the snapshot.
        mine = dict(_tensors(trackers_n[name].state_dict()))
        theirs = dict(_tensors(trackers_1[name].state_dict()))
        assert mine.keys() == theirs.keys()
        for path, value in theirs.items():
            if torch.is_tensor(value):
                assert torch.equal(mine[path], value), f"{name} {path}: max|d| {(mine[path].float() - value.float()).abs().max()}"
            else:
                assert mine[path] == value, f"{name} {path}: {mine[path]} vs {value}"
    print(f"max |batched - one-by-one| logit: {worst}")


def test_step_many_checks_every_request_before_running_any(model, streams):
    size, embeddings, _ = streams["a"]
    t1, t2 = model.new_tracker(size), model.new_tracker(size)
    click = Prompt(points=[[160, 90]], labels=[1])
    step_many([StepRequest(t1, 0, embeddings[0], click), StepRequest(t2, 0, embeddings[0], click)])
    before = [(t.last_frame_idx, len(t.bank), t.memory_bytes()) for t in (t1, t2)]
    small = build_model("sam2.1_hiera_tiny", checkpoint=None, image_size=64)
    cases = [
        ([StepRequest(t1, 1, embeddings[1]), StepRequest(t1, 2, embeddings[2])], 1, "appears twice"),
        ([StepRequest(t1, 1, embeddings[1]), StepRequest(t2, 0, embeddings[0])], 1, "increasing order"),
        ([StepRequest(t1, 1, embeddings[1]), StepRequest(model.new_tracker(size), 1, embeddings[1])], 1, "no prompt yet"),
        ([StepRequest(t1, 1, embeddings[1], Prompt(points=[[500, 10]], labels=[1]))], 0, "outside the 320x180 frame"),
        ([StepRequest(t2, 1, embeddings[1]), StepRequest(t1, 1, small.encode(np.zeros((1, 8, 8, 3), np.uint8))[0])], 1,
         "image size 64"),
        ([StepRequest(t1, 1, embeddings[1]), StepRequest(small.new_tracker(size), 0, embeddings[0], click)], 1,
         "another model"),
    ]
    for requests, index, message in cases:
        with pytest.raises(StepRequestError, match=message) as err:
            model.step_many(requests)
        assert err.value.request_index == index and isinstance(err.value, ValueError)
        assert [(t.last_frame_idx, len(t.bank), t.memory_bytes()) for t in (t1, t2)] == before, message
    assert model.step_many([]) == []


def test_mask_results_stay_small_until_full_resolution_is_asked(model, streams):
    size, embeddings, _ = streams["a"]
    tracker = model.new_tracker(size)
    result = tracker.step(0, embeddings[0], Prompt(points=[[160, 90]], labels=[1]))
    assert result.low_res_logits.shape == (1, S // 4, S // 4) and result.video_size == size
    assert "logits" not in result.__dict__, "full-resolution logits were computed eagerly"
    wire = pickle.dumps(result)
    assert len(wire) < 2 * result.low_res_logits.numel() * 4, f"{len(wire)} bytes on the wire"
    expected = F.interpolate(result.low_res_logits[None], size, mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(result.logits, expected) and result.logits is result.logits  # computed once, cached
    assert torch.equal(result.mask, expected > 0)
    same = pickle.loads(pickle.dumps(result))
    assert torch.equal(same.logits, expected) and same.video_size == size
    # Models whose full-resolution logits are not a bilinear upsampling (plug-ins, fakes) pass them.
    explicit = MaskResult(frame_idx=0, low_res_logits=torch.zeros(1, 4, 4), score=1.0, iou=0.5, logits=torch.ones(6, 8))
    assert explicit.video_size == (6, 8) and explicit.mask.all()
    with pytest.raises(ValueError, match="video_size"):
        MaskResult(frame_idx=0, low_res_logits=torch.zeros(1, 4, 4), score=1.0, iou=0.5)


def test_restore_tracker_resumes_a_snapshot(model, streams):
    size, embeddings, _ = streams["a"]
    tracker = model.new_tracker(size)
    tracker.step(0, embeddings[0], Prompt(points=[[160, 90]], labels=[1]))
    for i in range(1, 9):
        tracker.step(i, embeddings[i])
    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)
    buffer.seek(0)
    restored = model.restore_tracker(torch.load(buffer, weights_only=True))
    a, b = model.step_many([StepRequest(tracker, 9, embeddings[9]), StepRequest(restored, 9, embeddings[9])])
    assert torch.equal(a.low_res_logits, b.low_res_logits) and a.score == b.score
