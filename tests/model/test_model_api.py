"""Model API: strict loading of all eight variants, batching, bounded memory, single images, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from masklet.model import MemoryBank, Prompt, available_models, build_model, segment_image
from masklet.model.checkpoints import CheckpointMismatchError, load_state_dict_strict
from oracle import (
    CONFIG_FILES, build_official_video_predictor, compare_logits, install_torchvision_shim, ours_from, read_clip,
)


def test_available_models_lists_the_eight_official_variants():
    assert sorted(available_models()) == sorted(CONFIG_FILES)


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_official_state_dict_loads_strictly(name):
    """Names and shapes equal the official model's exactly, for every variant."""
    import sam2  # noqa: F401  (its import registers the config search path with hydra)
    from hydra import compose
    from hydra.utils import instantiate

    cfg = compose(config_name=CONFIG_FILES[name])
    official = instantiate(cfg.model, _recursive_=True)  # the official Hiera cannot be built on "meta"
    with torch.device("meta"):  # ours: shapes only, the load below assigns the official tensors
        ours = build_model(name, checkpoint=None, image_size=1024, device="meta")
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs, (
        f"missing: {sorted(set(theirs) - set(mine))[:10]} unexpected: {sorted(set(mine) - set(theirs))[:10]} "
        f"shape: {[(k, mine[k], theirs[k]) for k in mine.keys() & theirs.keys() if mine[k] != theirs[k]][:10]}"
    )
    ours.load_state_dict(official.state_dict(), strict=True, assign=True)


def test_wrong_variant_checkpoint_is_refused_with_named_keys():
    official = build_official_video_predictor("sam2.1_hiera_tiny", 256)
    ours = build_model("sam2_hiera_tiny", checkpoint=None, image_size=256)
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_strict(ours, official.state_dict(), model_name="sam2_hiera_tiny", source="sam2.1 weights")
    message = str(err.value)
    print(message)
    assert "no_obj_embed_spatial" in message and "sam2.1" in message


@pytest.fixture(scope="module")
def tiny_pair():
    official = build_official_video_predictor("sam2.1_hiera_tiny", 256)
    return official, ours_from(official, "sam2.1_hiera_tiny", 256)


def test_batched_encode_equals_single_frame_passes(tiny_pair, video_paths):
    _, ours = tiny_pair
    frames = np.stack(read_clip(video_paths[1], 3) + read_clip(video_paths[2], 2))  # two "streams"
    batched = ours.encode(frames)
    for i, frame in enumerate(frames):
        single = ours.encode(frame[None])[0]
        for a, b in zip((batched[i].image_embed, *batched[i].high_res_feats), (single.image_embed, *single.high_res_feats)):
            rel = ((a - b).abs().max() / b.std()).item()
            assert rel <= 1e-5, f"frame {i}: batched vs single rel diff {rel:.3g}"


def test_uint8_frames_of_any_size_are_preprocessed_inside(tiny_pair):
    _, ours = tiny_pair
    frames = torch.randint(0, 256, (2, 123, 321, 3), dtype=torch.uint8)
    embeddings = ours.encode(frames)
    assert embeddings[0].image_embed.shape == (256, 16, 16)
    assert embeddings[0].high_res_feats[0].shape == (32, 64, 64)
    assert embeddings[0].high_res_feats[1].shape == (64, 32, 32)
    with pytest.raises(ValueError, match="float frames must be normalised"):
        ours.encode(torch.zeros(1, 3, 100, 100))
    with pytest.raises(ValueError, match="uint8 frames must be"):
        ours.encode(torch.zeros(1, 10, 10, dtype=torch.uint8))


def test_memory_bank_stays_flat_over_400_frames():
    model = build_model("sam2.1_hiera_tiny", checkpoint=None, image_size=64)
    embedding = model.encode(torch.randint(0, 256, (1, 48, 64, 3), dtype=torch.uint8))[0]
    tracker = model.new_tracker((48, 64))
    tracker.step(0, embedding, Prompt(points=[[30, 20]], labels=[1]))
    sizes = []
    # 400 frames: 25x the longest window (16 pointers); a per-frame leak shows in every 50-frame sample.
    for i in range(1, 401):
        tracker.step(i, embedding)
        if i % 50 == 0:
            sizes.append((len(tracker.bank), tracker.memory_bytes()))
    print("bank (entries, bytes) every 50 frames:", sizes)
    assert len(set(sizes)) == 1, f"memory grew: {sizes}"
    c = model.config
    # One spatial memory and one pointer more than a step reads: a correction of the newest frame reads
    # one frame further back (tests/model/test_correction_parity.py).
    assert len(tracker.bank.recent) == c.max_obj_ptrs_in_encoder
    assert sum(e.memory is not None for e in tracker.bank.recent.values()) == c.num_maskmem


def test_conditioning_frames_are_capped_keeping_first_and_newest():
    model = build_model("sam2.1_hiera_tiny", checkpoint=None, image_size=64, max_cond_frames_in_memory=3)
    embedding = model.encode(torch.randint(0, 256, (1, 48, 64, 3), dtype=torch.uint8))[0]
    tracker = model.new_tracker((48, 64))
    for i in range(0, 50, 5):
        tracker.step(i, embedding, Prompt(points=[[30, 20]], labels=[1]))
    assert list(tracker.bank.conditioning) == [0, 40, 45]


def test_single_image_matches_official_image_predictor(tiny_pair, video_paths):
    install_torchvision_shim()
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    official, ours = tiny_pair
    image = read_clip(video_paths[0], 1)[0]
    pre = ours.preprocess(image[None])  # both sides get the same normalised tensor
    predictor = SAM2ImagePredictor(official)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # hard-coded for 1024 px upstream
    del predictor._transforms.to_tensor, predictor._transforms.transforms
    predictor._transforms.to_tensor = lambda img: pre[0]
    predictor._transforms.transforms = lambda x: x
    predictor.set_image(image)
    embedding = ours.encode(pre)[0]
    cases = [
        (dict(point_coords=np.array([[160.0, 90.0]]), point_labels=np.array([1])), Prompt(points=[[160, 90]], labels=[1]), True),
        (dict(box=np.array([90.0, 30.0, 240.0, 160.0])), Prompt(box=[90, 30, 240, 160]), False),
        (dict(point_coords=np.array([[160.0, 90.0], [60.0, 40.0]]), point_labels=np.array([1, 0]),
              box=np.array([90.0, 30.0, 240.0, 160.0])),
         Prompt(points=[[160, 90], [60, 40]], labels=[1, 0], box=[90, 30, 240, 160]), True),
    ]
    for kwargs, prompt, multimask in cases:
        ref_masks, ref_ious, ref_low = predictor.predict(multimask_output=multimask, return_logits=True, **kwargs)
        got = segment_image(ours, None, prompt, multimask=multimask, embedding=embedding, image_size=image.shape[:2])
        assert got.logits.shape[0] == (3 if multimask else 1)
        for m in range(got.logits.shape[0]):
            compare_logits(got.logits[m], torch.as_tensor(ref_masks[m]), f"image mask {m} ({prompt})")
        np.testing.assert_allclose(got.ious.numpy(), ref_ious, rtol=1e-5, atol=1e-6)
        # Feeding the best low-res mask back (iterative refinement) matches too.
        best = got.best()
        ref2, _, _ = predictor.predict(point_coords=np.array([[100.0, 100.0]]), point_labels=np.array([1]),
                                       mask_input=ref_low[best:best + 1], multimask_output=False, return_logits=True)
        got2 = segment_image(ours, None, Prompt(points=[[100, 100]], labels=[1]), multimask=False,
                             mask_input=got.low_res_logits[best:best + 1], embedding=embedding, image_size=image.shape[:2])
        compare_logits(got2.logits[0], torch.as_tensor(ref2[0]), "image refinement")


def test_bad_prompts_give_clear_errors(tiny_pair):
    _, ours = tiny_pair
    embedding = ours.encode(torch.randint(0, 256, (1, 90, 160, 3), dtype=torch.uint8))[0]
    tracker = ours.new_tracker((90, 160))
    with pytest.raises(ValueError, match="no prompt yet"):
        tracker.step(0, embedding)
    with pytest.raises(ValueError, match="outside the 160x90 frame"):
        tracker.step(0, embedding, Prompt(points=[[500, 10]], labels=[1]))
    with pytest.raises(ValueError, match="labels must be 1"):
        Prompt(points=[[1, 1]], labels=[5])
    with pytest.raises(ValueError, match="cannot be combined"):
        Prompt(points=[[1, 1]], mask=np.zeros((4, 4), bool))
    tracker.step(3, embedding, Prompt(points=[[50, 40]], labels=[1]))
    with pytest.raises(ValueError, match="increasing order"):
        tracker.step(2, embedding)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("sam3_hiera_huge")


def test_tracking_only_copy_matches_the_full_model(tiny_pair, tmp_path):
    """Tracker actors build without the image encoder; their masks must not change."""
    official, ours = tiny_pair
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official.state_dict()}, path)
    from_file = build_model("sam2.1_hiera_tiny", checkpoint=str(path), image_size=256, with_image_encoder=False)
    torch.manual_seed(0)
    full_random = build_model("sam2.1_hiera_tiny", checkpoint=None, image_size=256)
    torch.manual_seed(0)
    heads_random = build_model("sam2.1_hiera_tiny", checkpoint=None, image_size=256, with_image_encoder=False)
    assert from_file.image_encoder is None and heads_random.image_encoder is None
    n_full = sum(p.numel() for p in ours.parameters())
    n_heads = sum(p.numel() for p in from_file.parameters())
    print(f"parameters: full {n_full:,}, tracking-only {n_heads:,}")
    assert n_heads < n_full / 2
    with pytest.raises(RuntimeError, match="without its image encoder"):
        from_file.encode(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))

    frames = torch.randint(0, 256, (3, 90, 160, 3), dtype=torch.uint8)
    for encoder_model, tracking_model in ((ours, from_file), (full_random, heads_random)):
        embeddings = encoder_model.encode(frames)
        a, b = encoder_model.new_tracker((90, 160)), tracking_model.new_tracker((90, 160))
        prompt = Prompt(points=[[80, 45]], labels=[1])
        for i, emb in enumerate(embeddings):
            ra, rb = a.step(i, emb, prompt if i == 0 else None), b.step(i, emb, prompt if i == 0 else None)
            assert torch.equal(ra.logits, rb.logits), f"frame {i}: tracking-only copy differs"
