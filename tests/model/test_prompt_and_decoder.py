"""Parity of attention / prompt encoder / two-way transformer / mask decoder against sam2==1.1.0.

Each official module is built with the same kwargs, randomly initialised with a fixed seed (and
every parameter perturbed so swapped keys cannot cancel out), its state_dict is loaded into ours
with strict=True, and both run in eval mode on identical random inputs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

sam2 = pytest.importorskip("sam2")

from sam2.modeling.sam.mask_decoder import MaskDecoder as RefMaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder as RefPromptEncoder
from sam2.modeling.sam.transformer import Attention as RefAttention
from sam2.modeling.sam.transformer import RoPEAttention as RefRoPEAttention
from sam2.modeling.sam.transformer import TwoWayTransformer as RefTwoWayTransformer

from masklet.model.attention import Attention, RoPEAttention
from masklet.model.mask_decoder import MaskDecoder
from masklet.model.prompt_encoder import PromptEncoder
from masklet.model.two_way_transformer import TwoWayTransformer

REL_TOL = 1e-5
BACKBONE_STRIDE = 16


def assert_parity(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != reference {ref.dtype}"
    if ref.numel() == 0:
        return
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = ref.std().item() if ref.numel() > 1 else ref.abs().item()
    scale = scale if scale > 0 else 1.0
    rel = (ours - ref).abs().max().item() / scale
    assert rel <= REL_TOL, (
        f"{name}: max|diff|/std(ref) = {rel:.3e} > {REL_TOL}\n"
        f"  ours: mean={ours.mean():.6f} std={ours.std():.6f} min={ours.min():.6f} max={ours.max():.6f}\n"
        f"  ref : mean={ref.mean():.6f} std={ref.std():.6f} min={ref.min():.6f} max={ref.max():.6f}"
    )


def port(ref: nn.Module, ours: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Perturb the reference's parameters, load them into ours strictly, put both in eval mode."""
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


# --------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("downsample_rate,kv_in_dim", [(1, None), (2, None), (1, 64)])
def test_attention(downsample_rate, kv_in_dim):
    torch.manual_seed(0)
    kwargs = dict(embedding_dim=64, num_heads=4, downsample_rate=downsample_rate, kv_in_dim=kv_in_dim)
    ref, ours = port(RefAttention(**kwargs), Attention(**kwargs))
    q = torch.randn(2, 7, 64)
    kv = torch.randn(2, 11, kv_in_dim or 64)
    with torch.no_grad():
        assert_parity("attention", ours(q, kv, kv), ref(q, kv, kv))


ROPE_CASES = {
    # name: (rope kwargs, query grid side, number of memory frames, excluded pointer tokens)
    "self_attn_matching_feat_sizes": (dict(feat_sizes=(16, 16)), 16, 1, 0),
    "self_attn_default_feat_sizes_256px": (dict(), 16, 1, 0),
    "cross_attn_repeat_with_obj_ptrs": (dict(rope_k_repeat=True, kv_in_dim=64, feat_sizes=(16, 16)), 16, 3, 8),
    "cross_attn_grid_smaller_than_feat_sizes": (dict(rope_k_repeat=True, kv_in_dim=64, feat_sizes=(16, 16)), 8, 2, 4),
    "cross_attn_grid_larger_than_feat_sizes": (dict(rope_k_repeat=True, kv_in_dim=64, feat_sizes=(16, 16)), 24, 1, 4),
    "cross_attn_only_obj_ptrs": (dict(rope_k_repeat=True, kv_in_dim=64, feat_sizes=(16, 16)), 16, 0, 4),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_attention(case):
    rope_kwargs, side, num_frames, num_ptrs = ROPE_CASES[case]
    torch.manual_seed(1)
    kwargs = dict(embedding_dim=128, num_heads=1, downsample_rate=1, dropout=0.1, **rope_kwargs)
    ref, ours = port(RefRoPEAttention(**kwargs), RoPEAttention(**kwargs))
    kv_dim = rope_kwargs.get("kv_in_dim", 128)
    q = torch.randn(2, side * side, 128)
    kv = torch.randn(2, num_frames * side * side + num_ptrs, kv_dim)
    with torch.no_grad():
        for call in range(2):  # second call exercises the cached rotation tables
            out_ref = ref(q, kv, kv, num_k_exclude_rope=num_ptrs)
            out = ours(q, kv, kv, num_k_exclude_rope=num_ptrs)
            assert_parity(f"rope[{case}] call {call}", out, out_ref)


def test_rope_attention_not_in_state_dict():
    ours = RoPEAttention(64, 2, feat_sizes=(8, 8))
    assert set(ours.state_dict()) == set(RefRoPEAttention(64, 2, feat_sizes=(8, 8)).state_dict())


# ----------------------------------------------------------------------------- prompt encoder


def make_prompt_encoders(embed_dim=64, grid=8):
    torch.manual_seed(2)
    image_size = grid * BACKBONE_STRIDE
    kwargs = dict(
        embed_dim=embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    ref, ours = port(RefPromptEncoder(**kwargs), PromptEncoder(**kwargs))
    return ref, ours, image_size


def random_points(batch, num, image_size, with_pad=True):
    coords = torch.rand(batch, num, 2) * image_size
    labels = torch.randint(0, 4, (batch, num), dtype=torch.int32)
    if with_pad:
        labels[:, -1] = -1
        labels[0, 0] = -1
    return coords, labels


@pytest.mark.parametrize("use_points,use_boxes,use_masks", [
    (True, False, False),
    (True, True, False),
    (False, True, False),
    (True, True, True),
    (False, False, True),
    (False, False, False),
])
def test_prompt_encoder(use_points, use_boxes, use_masks):
    ref, ours, image_size = make_prompt_encoders()
    batch, grid = 3, 8
    points = random_points(batch, 5, image_size) if use_points else None
    boxes = torch.sort(torch.rand(batch, 2, 2) * image_size, dim=1).values.reshape(batch, 4) if use_boxes else None
    masks = torch.randn(batch, 1, 4 * grid, 4 * grid) if use_masks else None
    with torch.no_grad():
        sparse_ref, dense_ref = ref(points, boxes, masks)
        sparse, dense = ours(points, boxes, masks)
        assert_parity("sparse", sparse, sparse_ref)
        assert_parity("dense", dense, dense_ref)
        assert_parity("dense_pe", ours.get_dense_pe(), ref.get_dense_pe())


def test_prompt_encoder_float_labels_and_non_square():
    torch.manual_seed(3)
    kwargs = dict(embed_dim=32, image_embedding_size=(6, 10), input_image_size=(96, 160), mask_in_chans=8)
    ref, ours = port(RefPromptEncoder(**kwargs), PromptEncoder(**kwargs))
    coords = torch.rand(2, 4, 2) * torch.tensor([160.0, 96.0])
    labels = torch.tensor([[1.0, 0.0, -1.0, 1.0], [0.0, 2.0, 3.0, -1.0]])
    with torch.no_grad():
        sparse_ref, dense_ref = ref((coords, labels), None, None)
        sparse, dense = ours((coords, labels), None, None)
        assert_parity("sparse", sparse, sparse_ref)
        assert_parity("dense", dense, dense_ref)
        assert_parity("dense_pe", ours.get_dense_pe(), ref.get_dense_pe())


# ------------------------------------------------------------------------ two-way transformer


def test_two_way_transformer():
    torch.manual_seed(4)
    kwargs = dict(depth=2, embedding_dim=64, num_heads=4, mlp_dim=128)
    ref, ours = port(RefTwoWayTransformer(**kwargs), TwoWayTransformer(**kwargs))
    image, pe = torch.randn(2, 64, 6, 5), torch.randn(2, 64, 6, 5)
    tokens = torch.randn(2, 9, 64)
    with torch.no_grad():
        (q_ref, k_ref), (q, k) = ref(image, pe, tokens), ours(image, pe, tokens)
    assert_parity("queries", q, q_ref)
    assert_parity("keys", k, k_ref)


# ------------------------------------------------------------------------------- mask decoder

DECODER_CONFIGS = {
    "plain": dict(),
    "sam2_video": dict(
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
        dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
    ),
    "linear_obj_head": dict(pred_obj_scores=True, dynamic_multimask_via_stability=True),
}


def make_decoders(config: dict, dim: int = 64, heads: int = 4, mlp_dim: int = 128):
    torch.manual_seed(5)
    transformer_kwargs = dict(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads)
    kwargs = dict(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim, **config)
    ref = RefMaskDecoder(transformer=RefTwoWayTransformer(**transformer_kwargs), **kwargs)
    ours = MaskDecoder(transformer=TwoWayTransformer(**transformer_kwargs), **kwargs)
    return port(ref, ours)


def run_both(ref, ours, inputs: dict, names=("masks", "iou_pred", "sam_tokens_out", "object_score_logits")):
    with torch.no_grad():
        outs_ref, outs = ref(**inputs), ours(**inputs)
    assert len(outs) == len(outs_ref) == 4
    for name, out, out_ref in zip(names, outs, outs_ref):
        assert_parity(name, out, out_ref)
    return outs


@pytest.mark.parametrize("config_name", list(DECODER_CONFIGS))
@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("repeat_image", [True, False])
def test_mask_decoder(config_name, multimask_output, repeat_image):
    config = DECODER_CONFIGS[config_name]
    ref, ours = make_decoders(config)
    dim, grid, batch = 64, 8, 3
    image_batch = 1 if repeat_image else batch
    inputs = dict(
        image_embeddings=torch.randn(image_batch, dim, grid, grid),
        image_pe=torch.randn(1, dim, grid, grid),
        sparse_prompt_embeddings=torch.randn(batch, 4, dim),
        dense_prompt_embeddings=torch.randn(batch, dim, grid, grid),
        multimask_output=multimask_output,
        repeat_image=repeat_image,
    )
    if config.get("use_high_res_features"):
        inputs["high_res_features"] = [
            torch.randn(batch, dim // 8, 4 * grid, 4 * grid),
            torch.randn(batch, dim // 4, 2 * grid, 2 * grid),
        ]
    masks, iou, tokens, obj = run_both(ref, ours, inputs)
    num_out = 3 if multimask_output else 1
    assert masks.shape == (batch, num_out, 4 * grid, 4 * grid) and iou.shape == (batch, num_out)
    assert obj.shape == (batch, 1)
    token_count = 3 if (multimask_output and config.get("use_multimask_token_for_obj_ptr")) else 1
    assert tokens.shape == (batch, token_count, dim)


def test_dynamic_multimask_fallback_both_branches():
    ref, ours = make_decoders(DECODER_CONFIGS["sam2_video"])
    torch.manual_seed(6)
    all_masks = 0.01 * torch.randn(4, 4, 16, 16)  # near-zero logits: unstable
    all_masks[0, 0] = 10.0 * torch.sign(torch.randn(16, 16))  # saturated: stable
    all_masks[2, 0] = -10.0  # empty mask: area_u == 0 counts as stable
    all_iou = torch.rand(4, 4)
    masks_ref, iou_ref = ref._dynamic_multimask_via_stability(all_masks, all_iou)
    masks, iou = ours.select_stable_single_mask(all_masks, all_iou)
    assert_parity("fallback masks", masks, masks_ref)
    assert_parity("fallback iou", iou, iou_ref)
    best = all_iou[:, 1:].argmax(-1) + 1
    assert torch.equal(masks[0, 0], all_masks[0, 0]) and torch.equal(masks[2, 0], all_masks[2, 0])
    assert torch.equal(masks[1, 0], all_masks[1, best[1]]) and torch.equal(masks[3, 0], all_masks[3, best[3]])


def test_prompt_to_masks_real_size():
    """Prompt encoder -> mask decoder at the SAM 2 head sizes (dim 256, 8 heads, MLP 2048), 256 px image,
    with high-res features projected by the decoder's conv_s0/conv_s1 as SAM2Base does."""
    dim, grid = 256, 16
    ref_dec, dec = make_decoders(DECODER_CONFIGS["sam2_video"], dim=dim, heads=8, mlp_dim=2048)
    ref_pe, pe, image_size = make_prompt_encoders(embed_dim=dim, grid=grid)
    torch.manual_seed(7)
    batch = 2
    coords, labels = random_points(batch, 3, image_size, with_pad=False)
    labels[:, 0] = 1
    labels[:, 1] = 0
    boxes = torch.tensor([[10.0, 20.0, 200.0, 180.0], [0.0, 0.0, 255.0, 255.0]])
    mask_input = torch.randn(batch, 1, 4 * grid, 4 * grid)
    image = torch.randn(batch, dim, grid, grid)
    feat_s0 = torch.randn(batch, dim, 4 * grid, 4 * grid)
    feat_s1 = torch.randn(batch, dim, 2 * grid, 2 * grid)

    for multimask_output in (True, False):
        with torch.no_grad():
            sides = []
            for prompt_enc, decoder in ((ref_pe, ref_dec), (pe, dec)):
                sparse, dense = prompt_enc((coords, labels), boxes, mask_input)
                high_res = [decoder.conv_s0(feat_s0), decoder.conv_s1(feat_s1)]
                sides.append(
                    decoder(
                        image_embeddings=image,
                        image_pe=prompt_enc.get_dense_pe(),
                        sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense,
                        multimask_output=multimask_output,
                        repeat_image=False,
                        high_res_features=high_res,
                    )
                )
        names = ("masks", "iou_pred", "sam_tokens_out", "object_score_logits")
        for name, out, out_ref in zip(names, sides[1], sides[0]):
            assert_parity(f"{name} (multimask={multimask_output})", out, out_ref)


def test_decoder_state_dict_keys_match():
    for config in DECODER_CONFIGS.values():
        ref, ours = make_decoders(config)
        assert list(ours.state_dict()) == list(ref.state_dict())
