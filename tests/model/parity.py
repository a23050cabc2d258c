"""Shared parity helpers: official predictor / our model pairs, scenario drivers, the pass criterion.

Pass criterion on every frame: max|d logit| / std(ref) <= 1e-3 at video resolution and IoU >= 0.999.
"""
from __future__ import annotations

from typing import Optional

from masklet.model import Prompt, StepRequest
from oracle import build_official_video_predictor, compare_logits, official_state, ours_from, propagate

S = 256  # image size for parity (RoPE feat_sizes [16, 16])
N = 18  # >= 16 frames: SAM 2.1 normalises pointer time offsets by min(num_frames, 16) - 1
CLICK = [[160.0, 90.0]]
VIA = ["step", "step_many"]  # one tracker.step per object, or all objects of a frame in one step_many


_pairs: dict = {}


def pair(name: str, correct_as_cond: bool = False):
    """(official predictor, our model) sharing identical weights; cached per module run."""
    key = (name, correct_as_cond)
    if key not in _pairs:
        official = build_official_video_predictor(name, S, correct_as_cond=correct_as_cond)
        _pairs[key] = (official, ours_from(official, name, S))
    return _pairs[key]


_refs: dict = {}


def run_official_simple(official, frames, tmp_path, prompts: dict[int, dict], key=None):
    """prompts: obj_id -> kwargs for add_new_points_or_box / add_new_mask at frame 0.

    With a `key`, the official run is cached for the module, so the "step" and "step_many" variants of
    a scenario are compared against one reference run.
    """
    if key is not None and key in _refs:
        return _refs[key]
    state, images = official_state(official, frames, tmp_path)
    for obj_id, kw in prompts.items():
        if "mask" in kw:
            official.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=kw["mask"])
        else:
            official.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, **kw)
    out = state, images, propagate(official, state)
    if key is not None:
        _refs[key] = out
    return out


def run_ours(model, images, video_size, prompt: Prompt, start: int = 0, num_frames=None, via: str = "step"):
    embeddings = model.encode(images)
    outs, trackers = run_objects(model, embeddings, video_size, [prompt], start=start, num_frames=num_frames, via=via)
    return outs[0], trackers[0], embeddings


def run_objects(model, embeddings, video_size, prompts: list[Prompt], start: int = 0, num_frames=None,
                via: str = "step", corrections: Optional[dict[int, dict[int, Prompt]]] = None):
    """Every object prompted at `start`, then tracked to the end: one tracker each, stepped one object
    at a time ("step") or all objects of a frame in one call ("step_many").

    corrections: frame -> {object index: prompt}, applied with `refine` right after that frame's step;
    the refined result replaces the stepped one in the output.
    """
    trackers = [model.new_tracker(video_size, num_frames=num_frames) for _ in prompts]
    outs = [{} for _ in prompts]
    for i in range(start, len(embeddings)):
        requests = [StepRequest(t, i, embeddings[i], p if i == start else None) for t, p in zip(trackers, prompts)]
        if via == "step_many":
            results = model.step_many(requests)
        else:
            assert via == "step", via
            results = [r.tracker.step(r.frame_idx, r.embedding, r.prompt) for r in requests]
        for j, fix in (corrections or {}).get(i, {}).items():
            results[j] = trackers[j].refine(embeddings[i], fix)
        for out, result in zip(outs, results):
            out[i] = result
    return outs, trackers


def run_official_with_corrections(official, frames, tmp_path, prompts: dict[int, dict],
                                  corrections: dict[int, dict[int, tuple]], key=None):
    """The official predictor (built with add_all_frames_to_correct_as_cond) used as a stream: prompts at
    frame 0, propagate up to a corrected frame k, click there, propagate on from k, and so on.

    corrections: frame -> {obj_id: (points, labels)}. Returns (state, images, ref, refined) where ref maps
    frame -> [objects, H, W] logits (corrected frames as re-emitted by the propagation after the click) and
    refined maps (frame, obj_id) -> the logits add_new_points_or_box returned for the click.
    """
    if key is not None and key in _refs:
        return _refs[key]
    state, images = official_state(official, frames, tmp_path)
    for obj_id, kw in prompts.items():
        if "mask" in kw:
            official.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=kw["mask"])
        else:
            official.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, **kw)
    ref, refined, start = {}, {}, 0
    for k in sorted(corrections):
        ref.update(propagate(official, state, start_frame_idx=start, max_frame_num_to_track=k - start))
        for obj_id, (points, labels) in corrections[k].items():
            _, obj_ids, masks = official.add_new_points_or_box(state, frame_idx=k, obj_id=obj_id, points=points,
                                                               labels=labels)
            refined[(k, obj_id)] = masks[list(obj_ids).index(obj_id), 0].clone()
        start = k
    ref.update(propagate(official, state, start_frame_idx=start))
    out = state, images, ref, refined
    if key is not None:
        _refs[key] = out
    return out


def assert_all_frames(ours: dict, ref: dict, obj_index: int = 0, what: str = ""):
    assert sorted(ours) == sorted(ref), f"{what}: frames differ: ours {sorted(ours)} ref {sorted(ref)}"
    worst = 0.0
    for f in sorted(ref):
        rel, _ = compare_logits(ours[f].logits, ref[f][obj_index], f"{what} frame {f}")
        worst = max(worst, rel)
    return worst


