"""Assemble a SAM 2 model from its config, the way Meta's YAML configs wire the boxes together."""
from __future__ import annotations

import functools

import logging
from pathlib import Path
from typing import Optional

import torch

from .attention import RoPEAttention
from .checkpoints import load_state_dict_strict, read_checkpoint, resolve_checkpoint
from .config import ModelConfig, get_config
from .hiera import Hiera
from .image_encoder import FpnNeck, ImageEncoder
from .mask_decoder import MaskDecoder
from .memory_attention import MemoryAttention, MemoryAttentionLayer
from .memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from .position_encoding import PositionEmbeddingSine
from .prompt_encoder import PromptEncoder
from .sam2 import SAM2Model
from .two_way_transformer import TwoWayTransformer

log = logging.getLogger(__name__)


def _image_encoder(c: ModelConfig) -> ImageEncoder:
    t = c.trunk
    trunk = Hiera(
        embed_dim=t.embed_dim, num_heads=t.num_heads, stages=t.stages, global_att_blocks=t.global_att_blocks,
        window_pos_embed_bkg_spatial_size=t.window_pos_embed_bkg_spatial_size, window_spec=t.window_spec,
    )
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(c.hidden_dim, normalize=True, scale=None, temperature=10000),
        d_model=c.hidden_dim, backbone_channel_list=list(t.channel_list),
        fpn_top_down_levels=[2, 3], fpn_interp_model="nearest",
    )
    return ImageEncoder(trunk=trunk, neck=neck, scalp=1)  # scalp=1 drops the stride-32 level


def _memory_attention(c: ModelConfig) -> MemoryAttention:
    rope = dict(rope_theta=10000.0, feat_sizes=(c.feature_size, c.feature_size), embedding_dim=c.hidden_dim,
                num_heads=1, downsample_rate=1, dropout=0.1)
    layer = MemoryAttentionLayer(
        activation="relu", dim_feedforward=2048, dropout=0.1, pos_enc_at_attn=False, d_model=c.hidden_dim,
        pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
        self_attention=RoPEAttention(**rope),
        cross_attention=RoPEAttention(**rope, rope_k_repeat=True, kv_in_dim=c.mem_dim),
    )
    return MemoryAttention(d_model=c.hidden_dim, pos_enc_at_input=True, layer=layer, num_layers=c.memory_attention_layers)


def _memory_encoder(c: ModelConfig) -> MemoryEncoder:
    return MemoryEncoder(
        out_dim=c.mem_dim,
        position_encoding=PositionEmbeddingSine(c.mem_dim, normalize=True, scale=None, temperature=10000),
        mask_downsampler=MaskDownSampler(kernel_size=3, stride=2, padding=1),
        fuser=Fuser(CXBlock(dim=c.hidden_dim, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True),
                    num_layers=2),
    )


def _prompt_encoder(c: ModelConfig) -> PromptEncoder:
    return PromptEncoder(embed_dim=c.hidden_dim, image_embedding_size=(c.feature_size, c.feature_size),
                         input_image_size=(c.image_size, c.image_size), mask_in_chans=16)


def _mask_decoder(c: ModelConfig) -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=c.hidden_dim, mlp_dim=2048, num_heads=8),
        transformer_dim=c.hidden_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        use_high_res_features=True, iou_prediction_use_sigmoid=True,
        pred_obj_scores=True, pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True,
        dynamic_multimask_via_stability=c.dynamic_multimask_via_stability,
        dynamic_multimask_stability_delta=c.dynamic_multimask_stability_delta,
        dynamic_multimask_stability_thresh=c.dynamic_multimask_stability_thresh,
    )


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return device


def build_model(
    name: str = "sam2.1_hiera_tiny",
    checkpoint: Optional[str | Path] = None,
    image_size: int = 1024,
    device: str | torch.device = "cpu",
    *,
    progress: bool = True,
    with_image_encoder: bool = True,
    precision: str = "fp32",
    **config_overrides,
) -> SAM2Model:
    """Build a variant by name. checkpoint: None/"random" = random init, "auto" = download, or a path.

    precision: "fp32" (default; exact, bit-identical to the official predictor run in fp32) or "bf16"
    (encoder and tracker under bfloat16 autocast, as the official predictor runs on GPUs).

    with_image_encoder=False gives a tracking-only copy (per-object tracker actors): the image encoder
    is most of the model (212M of 224M parameters for large) and trackers only consume embeddings.
    """
    config = get_config(name, image_size=image_size, precision=precision, **config_overrides)
    path = resolve_checkpoint(name, checkpoint, progress=progress)
    # Random weights are drawn in construction order, so a random tracking-only copy still builds
    # (then drops) the image encoder: its heads must equal those of the full copy that encodes.
    build_encoder = with_image_encoder or path is None
    model = SAM2Model(
        config,
        image_encoder=_image_encoder(config) if build_encoder else None,
        memory_attention=_memory_attention(config),
        memory_encoder=_memory_encoder(config),
        prompt_encoder=_prompt_encoder(config),
        mask_decoder=_mask_decoder(config),
    )
    if path is not None:
        state_dict = read_checkpoint(path)
        if not build_encoder:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("image_encoder.")}
        load_state_dict_strict(model, state_dict, model_name=name, source=str(path))
        log.info("loaded %s weights from %s", name, path)
    if not with_image_encoder:
        model.image_encoder = None
    resolved = resolve_device(device)
    if precision == "bf16" and torch.device(resolved).type == "cpu" and not cpu_has_native_bf16():
        log.warning("precision bf16 on a CPU without native bf16 instructions (torch uses %s): bf16 runs "
                    "several times slower than fp32 here (~10x measured on an AVX2 EPYC); use fp32",
                    torch.backends.cpu.get_cpu_capability())
    return model.to(resolved).eval()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), which oneDNN's bf16 matrix products
    dispatch on; without them those products are emulated and far slower than fp32. Read once per
    process (every tracker copy builds a model)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
