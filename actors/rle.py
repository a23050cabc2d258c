"""COCO compressed RLE for masks (pycocotools), in the JSON form `{"size": [h, w], "counts": str}`."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as coco_mask


class RleError(ValueError):
    """A mask or RLE is malformed; the message says what is wrong."""


def _as_binary_mask(mask: Any) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise RleError(f"mask must be 2-D [H, W], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise RleError(f"mask must be non-empty, got shape {array.shape}")
    if array.dtype != np.bool_:
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise RleError(f"mask must be boolean or numeric, got dtype {array.dtype}")
        array = array > 0
    return array


def encode_mask(mask: Any) -> dict[str, Any]:
    """Encode a boolean [H, W] mask (non-zero counts as foreground) to JSON-ready COCO RLE."""
    binary = _as_binary_mask(mask)
    encoded = coco_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": [int(encoded["size"][0]), int(encoded["size"][1])], "counts": encoded["counts"].decode("ascii")}


def encode_masks(masks: Any) -> list[dict[str, Any]]:
    """Encode a stack of masks [N, H, W] in one pycocotools call."""
    stack = np.asarray(masks)
    if stack.ndim != 3:
        raise RleError(f"masks must be 3-D [N, H, W], got shape {stack.shape}")
    if stack.shape[0] == 0:
        return []
    binary = stack if stack.dtype == np.bool_ else stack > 0
    fortran_hwn = np.asfortranarray(np.moveaxis(binary.astype(np.uint8), 0, -1))
    return [
        {"size": [int(item["size"][0]), int(item["size"][1])], "counts": item["counts"].decode("ascii")}
        for item in coco_mask.encode(fortran_hwn)
    ]


def _to_coco(rle: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a JSON RLE and convert it to the form pycocotools' C functions accept."""
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise RleError('RLE must be a mapping with "size" and "counts"')
    size = rle["size"]
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise RleError(f"RLE size must be [height, width] of positive integers, got {size!r}")
    height, width = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("ascii")}
    if isinstance(counts, bytes):
        return {"size": [height, width], "counts": counts}
    if isinstance(counts, Sequence):
        # Uncompressed COCO RLE (list of run lengths): check the runs cover the mask exactly.
        runs = list(counts)
        if not all(isinstance(v, (int, np.integer)) and v >= 0 for v in runs) or sum(runs) != height * width:
            raise RleError(f"uncompressed RLE counts must be non-negative runs summing to {height * width}")
        return coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    raise RleError(f"RLE counts must be a string or a list of runs, got {type(counts).__name__}")


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode COCO RLE (compressed or uncompressed) to a boolean [H, W] mask."""
    coco = _to_coco(rle)
    height, width = coco["size"]
    try:
        with warnings.catch_warnings():
            # pycocotools' Cython buffer predates NumPy 2's `copy=` protocol; harmless, but noisy.
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = coco_mask.decode(coco)
    except Exception as exc:  # pycocotools raises bare exceptions on corrupt counts
        raise RleError(f"cannot decode RLE counts: {exc}") from None
    if decoded.shape != (height, width):
        raise RleError(f"RLE decoded to shape {decoded.shape}, expected {(height, width)}")
    return decoded.astype(bool)


def rle_area(rle: Mapping[str, Any]) -> int:
    """Foreground pixel count."""
    return int(coco_mask.area(_to_coco(rle)))


def rle_bbox(rle: Mapping[str, Any]) -> list[int]:
    """Tight bounding box [x, y, w, h] in pixels; [0, 0, 0, 0] for an empty mask."""
    x, y, w, h = coco_mask.toBbox(_to_coco(rle))
    return [int(x), int(y), int(w), int(h)]


def mask_bbox(mask: Any) -> list[int]:
    """Tight bounding box [x, y, w, h] of a boolean mask; [0, 0, 0, 0] when empty."""
    binary = _as_binary_mask(mask)
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        return [0, 0, 0, 0]
    cols = np.flatnonzero(binary.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
