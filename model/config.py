"""Model configuration: one frozen dataclass, and the eight official variants by name.

The values mirror Meta's YAML configs (sam2/configs/sam2*/) so official checkpoints load unchanged.
Only `image_size` and the Masklet-specific memory caps are meant to be changed by users.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class HieraConfig:
    embed_dim: int  # channels of the first Hiera stage (doubles at each stage)
    num_heads: int  # attention heads of the first stage (doubles at each stage)
    stages: tuple[int, ...]  # blocks per stage
    global_att_blocks: tuple[int, ...]  # block indices that attend globally instead of in windows
    window_pos_embed_bkg_spatial_size: tuple[int, int]  # grid of the background position embedding
    window_spec: tuple[int, ...] = (8, 4, 14, 7)  # attention window size per stage

    @property
    def channel_list(self) -> tuple[int, ...]:
        """Channels of the four stage outputs, deepest first (the FPN neck's `backbone_channel_list`)."""
        return tuple(self.embed_dim * 2**i for i in reversed(range(len(self.stages))))


@dataclass(frozen=True)
class ModelConfig:
    name: str  # official variant name, e.g. "sam2.1_hiera_tiny"
    trunk: HieraConfig
    image_size: int = 1024  # square input resolution; must be a multiple of 32 (RoPE/pos-embeds follow it)
    hidden_dim: int = 256  # FPN / prompt / decoder width
    mem_dim: int = 64  # memory-encoder output width (memory tokens)
    num_maskmem: int = 7  # 1 current + 6 previous frames of spatial memory
    memory_attention_layers: int = 4
    max_obj_ptrs_in_encoder: int = 16  # object pointers attended to (cond frames + recent frames)
    sigmoid_scale_for_mem_enc: float = 20.0  # mask -> memory-encoder input: sigmoid(x) * scale + bias
    sigmoid_bias_for_mem_enc: float = -10.0
    binarize_mask_from_pts_for_mem_enc: bool = True  # the official video predictor's setting
    # SAM 2.1 additions (False for SAM 2.0 checkpoints):
    no_obj_embed_spatial: bool = False  # learned embedding added to memories of absent objects
    add_tpos_enc_to_obj_ptrs: bool = False  # temporal position encoding on object pointers
    proj_tpos_enc_in_obj_ptrs: bool = False  # ... projected by obj_ptr_tpos_proj
    use_signed_tpos_enc_to_obj_ptrs: bool = False  # ... signed (past vs future)
    # Mask decoder post-processing applied by the official predictors:
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    # Masklet-specific, not part of the checkpoint:
    max_cond_frames_in_memory: int = 16  # conditioning frames kept per object (first + newest always kept)
    fill_hole_area: int = 0  # fill background holes up to this many low-res pixels; 0 disables
    # "fp32": exact (bit-identical to the official predictor in fp32). "bf16": encoder and tracker run
    # under bfloat16 autocast, as the official predictor does on GPUs; faster, masks drift slightly.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.image_size % 32 or self.image_size < 64:
            raise ValueError(f"image_size must be a multiple of 32 and >= 64, got {self.image_size}")
        if self.max_cond_frames_in_memory < 2:
            raise ValueError("max_cond_frames_in_memory must be >= 2 (first and newest are always kept)")
        if self.fill_hole_area < 0:
            raise ValueError("fill_hole_area must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def is_sam21(self) -> bool:
        return self.name.startswith("sam2.1")

    @property
    def feature_size(self) -> int:
        """Side of the top-level (stride 16) feature map, i.e. RoPE's feat_sizes."""
        return self.image_size // 16


_TRUNKS = {
    "tiny": HieraConfig(96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7)),
    "small": HieraConfig(96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7)),
    "base_plus": HieraConfig(112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14)),
    "large": HieraConfig(144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), window_spec=(8, 4, 16, 8)),
}


def _variant(version: str, size: str) -> ModelConfig:
    sam21 = version == "sam2.1"
    return ModelConfig(
        name=f"{version}_hiera_{size}",
        trunk=_TRUNKS[size],
        no_obj_embed_spatial=sam21,
        add_tpos_enc_to_obj_ptrs=sam21,
        proj_tpos_enc_in_obj_ptrs=sam21,
        use_signed_tpos_enc_to_obj_ptrs=sam21,
    )


VARIANTS: dict[str, ModelConfig] = {
    cfg.name: cfg for version in ("sam2", "sam2.1") for size in _TRUNKS for cfg in [_variant(version, size)]
}


def available_models() -> list[str]:
    """Names of the eight official variants."""
    return list(VARIANTS)


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(VARIANTS)}")
    return replace(VARIANTS[name], **overrides)
