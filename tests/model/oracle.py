"""Test-only bridge to the reference implementation (PyPI sam2==1.1.0, Meta's official code).

Builds the official SAM2VideoPredictor with random weights, sharpens those weights so the memory
path actually matters, and copies the very same weights into our model with strict loading.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from masklet.model import build_model
from masklet.model.checkpoints import load_state_dict_strict

CONFIG_FILES = {
    "sam2_hiera_tiny": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large": "configs/sam2/sam2_hiera_l.yaml",
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def _overrides(image_size: int) -> list[str]:
    f = image_size // 16
    return [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{f},{f}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{f},{f}]",
    ]


def build_official_video_predictor(name: str, image_size: int, *, correct_as_cond: bool = False, seed: int = 0,
                                   device: str = "cpu"):
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(seed)
    # Built and sharpened on the CPU (the sharpening draws from a CPU generator) so every device gets
    # the same weights, then moved; the predictor computes on whatever device its parameters are on.
    predictor = build_sam2_video_predictor(CONFIG_FILES[name], ckpt_path=None, device="cpu",
                                           hydra_overrides_extra=_overrides(image_size))
    predictor.fill_hole_area = 0  # its hole filler is a CUDA-only extension (skipped on CPU); ours is off too
    predictor.add_all_frames_to_correct_as_cond = correct_as_cond
    sharpen_random_weights(predictor)
    return predictor.to(device).eval()


@torch.no_grad()
def sharpen_random_weights(m: torch.nn.Module, seed: int = 1) -> None:
    """Default random init leaves memory nearly inert (a 1% change to a memory-attention weight moved
    logits by 5e-6), so a loose test would pass a broken memory bank. These scalings make the memory
    path matter, and the presence bias keeps objects "present" so masks are compared, not -1024s."""
    g = torch.Generator().manual_seed(seed)
    for layer in m.memory_attention.layers:
        for attn in (layer.self_attn, layer.cross_attn_image):
            attn.q_proj.weight.mul_(4.0)
            attn.k_proj.weight.mul_(4.0)
        layer.cross_attn_image.v_proj.weight.mul_(3.0)
    m.memory_encoder.out_proj.weight.mul_(3.0)
    for p in (m.no_mem_embed, m.no_mem_pos_enc, m.maskmem_tpos_enc):
        p.mul_(25.0)
    head = m.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    last.bias.fill_(8.0)
    # Randomise the otherwise all-zero / all-one parameters so every one of them is exercised.
    m.no_obj_ptr.add_(torch.randn(m.no_obj_ptr.shape, generator=g) * 0.5)
    if getattr(m, "no_obj_embed_spatial", None) is not None:
        m.no_obj_embed_spatial.add_(torch.randn(m.no_obj_embed_spatial.shape, generator=g) * 0.5)


def ours_from(official, name: str, image_size: int, **overrides):
    ours = build_model(name, checkpoint=None, image_size=image_size, **overrides)
    load_state_dict_strict(ours, official.state_dict(), model_name=name, source="official predictor")
    return ours.eval()


def read_clip(path: Path, num_frames: int, size: tuple[int, int] = (320, 180)) -> list[np.ndarray]:
    """First `num_frames` frames of a real clip, downscaled (keeps video-resolution comparisons cheap)."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(np.asarray(frame.to_image().resize(size, Image.BILINEAR)))
            if len(frames) == num_frames:
                break
    assert len(frames) == num_frames, f"{path} has only {len(frames)} frames"
    return frames


def official_state(predictor, frames: list[np.ndarray], tmp_path: Path):
    """init_state from a JPEG folder, as users of the official predictor do; returns (state, images)."""
    folder = tmp_path / "jpg"
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.jpg", quality=95)
    state = predictor.init_state(str(folder))
    return state, state["images"]


def propagate(predictor, state, **kwargs) -> dict[int, torch.Tensor]:
    """frame_idx -> [num_objects, H, W] video-resolution logits."""
    return {f: logits[:, 0].clone() for f, _, logits in predictor.propagate_in_video(state, **kwargs)}


def compare_logits(ours: torch.Tensor, ref: torch.Tensor, what: str, rel_tol: float = 1e-3, min_iou: float = 0.999):
    """The issue's pass criterion: max|d| / std(ref) <= 1e-3 and mask IoU >= 0.999. Prints both sides."""
    ours, ref = ours.float(), ref.float()
    diff = (ours - ref).abs().max().item()
    spread = ref.std().item()
    rel = diff / max(spread, 1e-6)
    a, b = ours > 0, ref > 0
    union = (a | b).sum().item()
    iou = 1.0 if union == 0 else (a & b).sum().item() / union
    ok = rel <= rel_tol and iou >= min_iou
    assert ok, (
        f"{what}: max|d|={diff:.3g} std(ref)={spread:.3g} rel={rel:.3g} (tol {rel_tol}) IoU={iou:.5f} (min {min_iou})\n"
        f"  ours: mean={ours.mean():.4f} min={ours.min():.4f} max={ours.max():.4f} area={a.sum().item()}\n"
        f"  ref:  mean={ref.mean():.4f} min={ref.min():.4f} max={ref.max():.4f} area={b.sum().item()}"
    )
    return rel, iou


def install_torchvision_shim() -> None:
    """sam2's image predictor imports torchvision.transforms only for its preprocessing, which the
    parity test bypasses (both sides get the same preprocessed tensor). torchvision's wheel cannot be
    installed beside this torch build, so provide the three names it imports."""
    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")

    class _Identity(torch.nn.Module):  # scriptable: SAM2Transforms wraps these in torch.jit.script
        def __init__(self, *args, **kwargs):
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    transforms.Normalize = transforms.Resize = transforms.ToTensor = _Identity
    tv.transforms = transforms
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = transforms
