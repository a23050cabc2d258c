"""Publishing from low-resolution logits is exact: the RLE, bbox and area of `actors.masks` equal
pycocotools on `F.interpolate(low, (H, W), bilinear, align_corners=False) > 0` (what the official
predictor's masks are), bit for bit, for smooth and ragged masks, absent objects, full frames and
every size pair; the kernel choice is calibrated against torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as coco

from masklet.actors.masks import mask_kernel, summarize_binary, summarize_mask, upsample_logits


def reference(low: np.ndarray, size: tuple[int, int]):
    logits = F.interpolate(torch.from_numpy(low)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    mask = (logits > 0).numpy()
    rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(coco.area(rle))
    bbox = tuple(int(v) for v in coco.toBbox(rle)) if area else (0, 0, 0, 0)
    return logits.numpy(), rle["counts"].decode(), bbox, area


def lows(rng, side: int):
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    cy, cx = rng.integers(0, side, 2)
    yield "noise", (rng.standard_normal((side, side)) * 5).astype(np.float32)
    yield "blob", (8 - np.hypot(yy - cy, xx - cx) / 2 + rng.standard_normal((side, side))).astype(np.float32)
    yield "smooth", (side / 4 - np.hypot(yy - cy, xx - cx)).astype(np.float32)
    yield "absent", np.full((side, side), -1024.0, np.float32)
    yield "mostly_present", (rng.standard_normal((side, side)) + 3).astype(np.float32)


@pytest.mark.parametrize("side", [16, 64, 256])
def test_summary_equals_pycocotools_on_torchs_upsampling(side):
    rng = np.random.default_rng(side)
    failures = []
    for trial in range(12):
        size = (int(rng.integers(1, 800)), int(rng.integers(1, 1400)))
        for kind, low in lows(rng, side):
            _, counts, bbox, area = reference(low, size)
            got = summarize_mask(low, size)
            if (got.counts, got.bbox, got.area) != (counts, bbox, area):
                failures.append(f"{kind} {side}->{size}: ours bbox {got.bbox} area {got.area}, torch+coco bbox "
                                f"{bbox} area {area}")
    assert not failures, "\n".join(failures[:10])


def test_calibrated_kernel_matches_torch_and_upsampled_logits_are_torchs():
    rng = np.random.default_rng(7)
    for side, size in [(64, (720, 1280)), (256, (720, 1280)), (64, (48, 64)), (16, (48, 64)), (64, (64, 64))]:
        low = (rng.standard_normal((side, side)) * 8).astype(np.float32)
        kernel = mask_kernel((side, side), size)
        assert kernel in ("fused", "torch")
        ours = upsample_logits(low, size, kernel)
        theirs, *_ = reference(low, size)
        assert np.array_equal(ours.view(np.int32), theirs.view(np.int32)), (side, size, kernel)


def test_binary_masks_summarise_like_pycocotools():
    rng = np.random.default_rng(3)
    for _ in range(300):
        h, w = rng.integers(1, 14, size=2)
        mask = rng.random((h, w)) < rng.random()
        rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        got = summarize_binary(mask)
        assert got.counts == rle["counts"].decode() and got.area == int(mask.sum())
        assert np.array_equal(got.to_mask(), mask)


def test_tiny_logits_underflow_exactly_as_torch():
    """Logits near float32's smallest values: products round to zero in torch's kernel; ours too."""
    ys, xs = np.mgrid[0:64, 0:64].astype(np.float32)
    for scale in (1e-30, 1e-38, 1e-44):
        low = ((10 - np.hypot(xs - 30, ys - 20)) * scale).astype(np.float32)
        _, counts, bbox, area = reference(low, (720, 1280))
        got = summarize_mask(low, (720, 1280), mask_kernel((64, 64), (720, 1280)))
        assert (got.counts, got.bbox, got.area) == (counts, bbox, area), scale


@pytest.mark.parametrize("side", [16, 64])
def test_both_exact_paths_equal_torch_whatever_the_crop_size(side):
    """summarize_mask computes a small object's crop pixel by pixel and a large one's by cells
    (masks.SMALL_CROP decides, for speed only): each path alone must equal torch on every case,
    underflowing logits included."""
    from masklet.actors import masks

    rng = np.random.default_rng(side + 7)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    cases = [(kind, low) for _ in range(4) for kind, low in lows(rng, side) if kind != "absent"]
    cases += [(f"tiny {scale}", ((side / 6 - np.hypot(xs - side / 3, ys - side / 2)) * scale).astype(np.float32))
              for scale in (1e-30, 1e-38, 1e-44)]
    failures = []
    for kind, low in cases:
        size = (int(rng.integers(1, 500)), int(rng.integers(1, 700)))
        window = masks.positive_window(low, size)
        if window is None:
            continue
        _, counts, bbox, area = reference(low, size)
        for path in (masks._summary_by_pixels, masks._summary_by_cells):
            got = path(low, *window, size)
            if (got.counts, got.bbox, got.area) != (counts, bbox, area):
                failures.append(f"{path.__name__} {kind} {side}->{size}: ours bbox {got.bbox} area {got.area}, "
                                f"torch+coco bbox {bbox} area {area}")
    assert not failures, "\n".join(failures[:10])


def test_a_positive_logit_no_output_pixel_reads_gives_an_empty_mask():
    """Shrinking (video smaller than the logits): bilinear reads only some low-res rows; a positive
    logit on a row no output pixel reads gives an empty mask, not an error (found by fuzzing)."""
    low = np.full((64, 64), -5.0, np.float32)
    low[1, 1] = 5.0
    size = (4, 4)  # reads rows/columns 7-8, 23-24, ...: never 1
    _, counts, bbox, area = reference(low, size)
    got = summarize_mask(low, size)
    assert (got.counts, got.bbox, got.area) == (counts, bbox, area) and area == 0
