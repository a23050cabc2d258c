"""Corrections (`refine`) vs the official predictor built with add_all_frames_to_correct_as_cond=True.

A click on an already tracked frame k makes the official predictor attend to the spatial memories of
k-6 ... k-1 and the pointers of k-15 ... k-1, one frame further back than the step of k+1 reads. These
tests correct frames well past both windows. Criterion on every frame: max|d logit| / std(ref) <= 1e-3
and IoU >= 0.999 (compare_logits).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import masklet.model.memory_bank as memory_bank
from masklet.model import Prompt
from oracle import compare_logits, read_clip
from parity import CLICK, VIA, assert_all_frames, pair, run_objects, run_official_with_corrections

N_LONG = 26  # room for a correction past the 16-frame pointer window, then 8 more frames


@pytest.fixture(scope="module")
def clip(video_paths):
    return read_clip(video_paths[0], N_LONG)


def check_scenario(ours, images, state, ref, refined, prompts, corrections, via):
    """Our trackers through the same scenario; every frame and every refined output vs the official."""
    size = (state["video_height"], state["video_width"])
    ours_corrections = {k: {obj_id - 1: Prompt(points=p, labels=l) for obj_id, (p, l) in fixes.items()}
                        for k, fixes in corrections.items()}
    outs, trackers = run_objects(ours, ours.encode(images), size, prompts, via=via, corrections=ours_corrections)
    worst = 0.0
    for (k, obj_id), logits in refined.items():
        rel, _ = compare_logits(outs[obj_id - 1][k].logits, logits, f"object {obj_id} refined at frame {k} via {via}")
        worst = max(worst, rel)
        assert outs[obj_id - 1][k].is_conditioning and k in trackers[obj_id - 1].bank.conditioning
    for j in range(len(prompts)):
        worst = max(worst, assert_all_frames(outs[j], ref, j, f"object {j + 1} via {via}"))
    return outs, worst


# Object 1: a positive click at 9 (past the 7-frame spatial window), a negative one at 21.
# Object 2: a negative click at 17 (past the 16-frame pointer window, with no earlier correction).
TWO_OBJECTS = {1: dict(points=CLICK, labels=[1]), 2: dict(points=[[60.0, 140.0]], labels=[1])}
TWO_PROMPTS = [Prompt(points=CLICK, labels=[1]), Prompt(points=[[60.0, 140.0]], labels=[1])]
TWO_CORRECTIONS = {9: {1: ([[120.0, 70.0]], [1])}, 17: {2: ([[75.0, 150.0]], [0])}, 21: {1: ([[200.0, 100.0]], [0])}}


@pytest.mark.parametrize("via", VIA)
def test_corrections_past_the_memory_window_match_official(via, clip, tmp_path):
    official, ours = pair("sam2.1_hiera_tiny", correct_as_cond=True)
    state, images, ref, refined = run_official_with_corrections(official, clip, tmp_path, TWO_OBJECTS, TWO_CORRECTIONS,
                                                                key=("corrections", "two objects"))
    outs, worst = check_scenario(ours, images, state, ref, refined, TWO_PROMPTS, TWO_CORRECTIONS, via)
    print(f"two objects, corrections at {sorted(TWO_CORRECTIONS)} via {via}: worst rel diff {worst:.3g}")


def test_the_window_fix_is_what_makes_corrections_exact(clip, tmp_path, monkeypatch):
    """Mutation test: with the bank trimmed to what a step reads (the old bounds), the scenario above fails."""
    official, ours = pair("sam2.1_hiera_tiny", correct_as_cond=True)
    state, images, ref, refined = run_official_with_corrections(official, clip, tmp_path, TWO_OBJECTS, TWO_CORRECTIONS,
                                                                key=("corrections", "two objects"))
    init = memory_bank.MemoryBank.__init__

    def step_window_only(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.kept_spatial, self.kept_pointers = self.num_spatial, self.num_pointers

    monkeypatch.setattr(memory_bank.MemoryBank, "__init__", step_window_only)
    with pytest.raises(AssertionError) as failure:
        check_scenario(ours, images, state, ref, refined, TWO_PROMPTS, TWO_CORRECTIONS, "step")
    print("old window detected:", str(failure.value).splitlines()[0])


@pytest.mark.parametrize("k", [6, 7])
def test_one_correction_matches_official(k, clip, tmp_path):
    """The issue's held-out scenario (k = 7: 18 frames, click at 0, one correction), and k = 6 before the
    window fills."""
    official, ours = pair("sam2.1_hiera_tiny", correct_as_cond=True)
    frames = clip[:18]
    corrections = {k: {1: ([[120.0, 70.0]], [0])}}
    state, images, ref, refined = run_official_with_corrections(official, frames, tmp_path,
                                                                {1: dict(points=CLICK, labels=[1])}, corrections)
    outs, worst = check_scenario(ours, images, state, ref, refined, [Prompt(points=CLICK, labels=[1])], corrections,
                                 "step")
    stepped = ours.new_tracker((state["video_height"], state["video_width"]))
    embeddings = ours.encode(images[: k + 1])
    stepped.step(0, embeddings[0], Prompt(points=CLICK, labels=[1]))
    for i in range(1, k + 1):
        before = stepped.step(i, embeddings[i])
    assert (outs[0][k].logits - before.logits).abs().max() > 1e-3, "the correction changed nothing: vacuous test"
    print(f"correction at {k}: worst rel diff {worst:.3g} over 18 frames")


def test_correction_after_a_mask_prompt_matches_official(clip, tmp_path):
    official, ours = pair("sam2.1_hiera_tiny", correct_as_cond=True)
    h, w = clip[0].shape[:2]
    yy, xx = np.mgrid[:h, :w]
    mask = ((xx - 150) / 60.0) ** 2 + ((yy - 95) / 40.0) ** 2 <= 1.0
    corrections = {10: {1: ([[230.0, 60.0]], [1])}}
    state, images, ref, refined = run_official_with_corrections(official, clip[:18], tmp_path, {1: dict(mask=mask)},
                                                                corrections)
    _, worst = check_scenario(ours, images, state, ref, refined, [Prompt(mask=mask)], corrections, "step_many")
    print(f"mask prompt, correction at 10: worst rel diff {worst:.3g}")


def test_snapshot_carries_what_a_correction_needs(clip, tmp_path):
    """Snapshot right after frame k, restore, correct k: the same numbers as the uninterrupted tracker."""
    _, ours = pair("sam2.1_hiera_tiny", correct_as_cond=True)
    embeddings = ours.encode(np.stack(clip[:20]))
    size = clip[0].shape[:2]
    tracker = ours.new_tracker(size)
    tracker.step(0, embeddings[0], Prompt(points=CLICK, labels=[1]))
    for i in range(1, 17):
        tracker.step(i, embeddings[i])
    restored = ours.restore_tracker(tracker.state_dict())
    spatial = [f for f, e in restored.bank.recent.items() if e.memory is not None]
    assert spatial == list(range(10, 17)) and list(restored.bank.recent) == list(range(1, 17)), restored.bank.recent.keys()
    fix = Prompt(points=[[120.0, 70.0]], labels=[0])
    a, b = tracker.refine(embeddings[16], fix), restored.refine(embeddings[16], fix)
    assert torch.equal(a.low_res_logits, b.low_res_logits) and a.score == b.score
    for i in range(17, 20):
        a, b = tracker.step(i, embeddings[i]), restored.step(i, embeddings[i])
        assert torch.equal(a.low_res_logits, b.low_res_logits), f"frame {i} differs after restore"
