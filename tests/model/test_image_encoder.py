"""Parity tests of the image encoder box (position encodings, Hiera trunk, FPN neck) against sam2==1.1.0."""
from __future__ import annotations

import pytest
import torch

from masklet.model.hiera import Hiera
from masklet.model.image_encoder import FpnNeck, ImageEncoder
from masklet.model.position_encoding import PositionEmbeddingSine, sine_embedding_1d

sam2_hieradet = pytest.importorskip("sam2.modeling.backbones.hieradet")
from sam2.modeling.backbones import image_encoder as sam2_image_encoder  # noqa: E402
from sam2.modeling import position_encoding as sam2_position_encoding  # noqa: E402
from sam2.modeling.sam2_utils import get_1d_sine_pe  # noqa: E402

REL_TOL = 1e-5

# Trunk / neck kwargs copied from sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml (identical in sam2/configs/sam2).
TRUNKS = {
    "tiny": dict(
        embed_dim=96, num_heads=1, stages=[1, 2, 7, 2], global_att_blocks=[5, 7, 9],
        window_pos_embed_bkg_spatial_size=[7, 7],
    ),
    "small": dict(
        embed_dim=96, num_heads=1, stages=[1, 2, 11, 2], global_att_blocks=[7, 10, 13],
        window_pos_embed_bkg_spatial_size=[7, 7],
    ),
    "base_plus": dict(embed_dim=112, num_heads=2),
    "large": dict(
        embed_dim=144, num_heads=2, stages=[2, 6, 36, 4], global_att_blocks=[23, 33, 43],
        window_pos_embed_bkg_spatial_size=[7, 7], window_spec=[8, 4, 16, 8],
    ),
    # Not an official size: a cheap trunk with large's window spec (windows that tile 256/512 inputs exactly).
    "mini_large_windows": dict(
        embed_dim=32, num_heads=1, stages=[1, 1, 3, 1], global_att_blocks=[3],
        window_pos_embed_bkg_spatial_size=[7, 7], window_spec=[8, 4, 16, 8],
    ),
}
NECK_CHANNELS = {"tiny": [768, 384, 192, 96], "small": [768, 384, 192, 96], "mini_large_windows": [256, 128, 64, 32]}
OFFICIAL_NECK = dict(d_model=256, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != reference {ref.dtype}"
    ref_std = ref.float().std().clamp_min(1e-12)
    max_abs = (ours.float() - ref.float()).abs().max()
    rel = (max_abs / ref_std).item()
    assert rel <= REL_TOL, (
        f"{name}: max|d|/std = {rel:.3e} > {REL_TOL:.0e}\n"
        f"  ours: mean={ours.float().mean():.6f} std={ours.float().std():.6f} "
        f"min={ours.float().min():.6f} max={ours.float().max():.6f}\n"
        f"  ref : mean={ref.float().mean():.6f} std={ref.float().std():.6f} "
        f"min={ref.float().min():.6f} max={ref.float().max():.6f}"
    )


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter so that zero-initialised ones (pos_embed, biases) and unit LayerNorm weights
    actually take part in the comparison."""
    gen = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.add_(0.05 * torch.randn(param.shape, generator=gen))


def build_reference_encoder(size: str, scalp: int, **neck_overrides):
    trunk = sam2_hieradet.Hiera(**TRUNKS[size])
    neck_kwargs = {**OFFICIAL_NECK, **neck_overrides}
    neck = sam2_image_encoder.FpnNeck(
        position_encoding=sam2_position_encoding.PositionEmbeddingSine(num_pos_feats=256, warmup_cache=False),
        backbone_channel_list=NECK_CHANNELS[size],
        **neck_kwargs,
    )
    return sam2_image_encoder.ImageEncoder(trunk=trunk, neck=neck, scalp=scalp), neck_kwargs


def build_our_encoder(size: str, scalp: int, neck_kwargs: dict) -> ImageEncoder:
    trunk = Hiera(**TRUNKS[size])
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=256),
        backbone_channel_list=NECK_CHANNELS[size],
        **neck_kwargs,
    )
    return ImageEncoder(trunk=trunk, neck=neck, scalp=scalp)


def check_encoder_parity(size: str, image_size: int, batch: int = 1, scalp: int = 1, **neck_overrides) -> None:
    torch.manual_seed(0)
    reference, neck_kwargs = build_reference_encoder(size, scalp, **neck_overrides)
    randomize_(reference, seed=1)
    ours = build_our_encoder(size, scalp, neck_kwargs)
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.eval()
    ours.eval()

    image = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    trunk_outputs = {}  # captured by hooks so the trunks run only once, inside ImageEncoder.forward
    reference.trunk.register_forward_hook(lambda m, args, out: trunk_outputs.__setitem__("ref", out))
    ours.trunk.register_forward_hook(lambda m, args, out: trunk_outputs.__setitem__("ours", out))
    with torch.no_grad():
        ref_out = reference(image)
        our_out = ours(image)
    ref_trunk, our_trunk = trunk_outputs["ref"], trunk_outputs["ours"]

    strides = [4, 8, 16, 32]
    assert len(our_trunk) == len(ref_trunk) == 4
    for level, (o, r) in enumerate(zip(our_trunk, ref_trunk)):
        side = image_size // strides[level]
        assert o.shape[-2:] == (side, side)
        assert_close(f"{size}@{image_size} trunk[{level}]", o, r)

    assert set(our_out) == set(ref_out) == {"vision_features", "vision_pos_enc", "backbone_fpn"}
    assert_close(f"{size}@{image_size} vision_features", our_out["vision_features"], ref_out["vision_features"])
    for key in ("vision_pos_enc", "backbone_fpn"):
        assert len(our_out[key]) == len(ref_out[key]) == 4 - scalp
        for level, (o, r) in enumerate(zip(our_out[key], ref_out[key])):
            assert_close(f"{size}@{image_size} {key}[{level}]", o, r)


# ----------------------------------------------------------------------------------------------------------
# position encodings
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(64, 64), (16, 16), (7, 12), (1, 3)])
@pytest.mark.parametrize("kwargs", [dict(num_pos_feats=256), dict(num_pos_feats=64, temperature=20, scale=3.0)])
def test_position_embedding_sine_matches_official(hw, kwargs):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *hw)
    ref = sam2_position_encoding.PositionEmbeddingSine(**kwargs, warmup_cache=False)(x)
    ours_module = PositionEmbeddingSine(**kwargs)
    ours = ours_module(x)
    assert ours.shape == (2, kwargs["num_pos_feats"], *hw)
    assert_close(f"PositionEmbeddingSine{hw}", ours, ref)
    # A second call is served from the cache and must not alias it.
    ours.zero_()
    assert_close(f"PositionEmbeddingSine{hw} cached", ours_module(x), ref)


def test_position_embedding_sine_unnormalized_matches_official():
    x = torch.zeros(1, 1, 9, 5)
    ref = sam2_position_encoding.PositionEmbeddingSine(32, normalize=False, warmup_cache=False)(x)
    assert_close("PositionEmbeddingSine unnormalized", PositionEmbeddingSine(32, normalize=False)(x), ref)
    with pytest.raises(ValueError):
        PositionEmbeddingSine(32, normalize=False, scale=1.0)


@pytest.mark.parametrize("dim,temperature", [(64, 10000), (256, 10000), (10, 50)])
def test_sine_embedding_1d_matches_official(dim, temperature):
    positions = torch.tensor([0.0, 1.0, 2.5, 7.0, 100.0, -3.0])
    ref = get_1d_sine_pe(positions, dim=dim, temperature=temperature)
    ours = sine_embedding_1d(positions, dim, temperature=temperature)
    assert ours.shape == (positions.shape[0], dim)
    assert_close(f"sine_embedding_1d(dim={dim})", ours, ref)


# ----------------------------------------------------------------------------------------------------------
# trunk + neck parity
# ----------------------------------------------------------------------------------------------------------


def test_tiny_encoder_256_matches_official():
    check_encoder_parity("tiny", 256)


def test_small_encoder_256_matches_official():
    check_encoder_parity("small", 256)


def test_tiny_encoder_512_matches_official():
    check_encoder_parity("tiny", 512)


def test_large_window_spec_batched_bilinear_avg_matches_official():
    # Large's window spec, batch of 2 (window merge must keep samples apart), default neck (bilinear top-down on
    # every level), average fusion and no scalp.
    check_encoder_parity(
        "mini_large_windows", 256, batch=2, scalp=0,
        fpn_top_down_levels=None, fpn_interp_model="bilinear", fuse_type="avg",
    )


def test_mini_trunk_1024_matches_official():
    torch.manual_seed(0)
    reference = sam2_hieradet.Hiera(**TRUNKS["mini_large_windows"])
    randomize_(reference, seed=3)
    ours = Hiera(**TRUNKS["mini_large_windows"])
    ours.load_state_dict(reference.state_dict(), strict=True)
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_out, our_out = reference.eval()(image), ours.eval()(image)
    assert [tuple(o.shape[-2:]) for o in our_out] == [(256, 256), (128, 128), (64, 64), (32, 32)]
    for level, (o, r) in enumerate(zip(our_out, ref_out)):
        assert_close(f"mini@1024 trunk[{level}]", o, r)


def test_trunk_variants_match_official():
    # Fewer pooling stages and only the last stage returned.
    # (The official code cannot pool inside a global-attention block, so block 2 stays windowed.)
    kwargs = dict(embed_dim=16, num_heads=1, stages=[1, 1, 2, 1], q_pool=2, global_att_blocks=[3],
                  window_spec=[8, 4, 4, 2], window_pos_embed_bkg_spatial_size=[4, 4])
    for return_interm_layers in (True, False):
        torch.manual_seed(0)
        reference = sam2_hieradet.Hiera(**kwargs, return_interm_layers=return_interm_layers)
        randomize_(reference, seed=5)
        ours = Hiera(**kwargs, return_interm_layers=return_interm_layers)
        ours.load_state_dict(reference.state_dict(), strict=True)
        assert ours.channel_list == ours.channels_list == reference.channel_list
        image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            ref_out, our_out = reference.eval()(image), ours.eval()(image)
        assert len(our_out) == len(ref_out)
        for level, (o, r) in enumerate(zip(our_out, ref_out)):
            assert_close(f"variant(interm={return_interm_layers})[{level}]", o, r)


# ----------------------------------------------------------------------------------------------------------
# construction-only checks for the big trunks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "small", "base_plus", "large"])
def test_trunk_state_dict_keys_and_shapes_match_official(size, monkeypatch):
    # The official trunk calls .item() on a linspace, which meta tensors cannot do; keep that one on the CPU.
    real_linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: real_linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):  # no allocation or init cost
        reference = sam2_hieradet.Hiera(**TRUNKS[size])
        ours = Hiera(**TRUNKS[size])
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert list(our_shapes) == list(ref_shapes)
    assert our_shapes == ref_shapes
    assert ours.channel_list == reference.channel_list
    assert ours.stage_ends == reference.stage_ends and ours.q_pool_blocks == reference.q_pool_blocks
    assert [b.window_size for b in ours.blocks] == [b.window_size for b in reference.blocks]
    assert [b.attn.num_heads for b in ours.blocks] == [b.attn.num_heads for b in reference.blocks]


def test_neck_state_dict_keys_match_official():
    ref = sam2_image_encoder.FpnNeck(
        sam2_position_encoding.PositionEmbeddingSine(256, warmup_cache=False), backbone_channel_list=[896, 448, 224, 112],
        **OFFICIAL_NECK,
    )
    ours = FpnNeck(PositionEmbeddingSine(256), backbone_channel_list=[896, 448, 224, 112], **OFFICIAL_NECK)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with pytest.raises(AssertionError):
        ImageEncoder(Hiera(**TRUNKS["mini_large_windows"]), ours)
