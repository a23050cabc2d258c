"""COCO compressed RLE for masks (pycocotools), in the JSON form `{"size": [h, w], "counts": str}`."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as coco_mask


class RleError(ValueError):
    """A mask or RLE is malformed; the message says what is wrong."""


# pycocotools' reader shifts 5-bit groups as C ints: a 7th character would overflow (undefined
# behaviour), so runs have at most 6 characters (29 bits and a sign), and no mask may hold more
# pixels than one such run can count. Real limits (the frame size) are far below this ceiling.
_MAX_RUN_CHARS = 6
MAX_RLE_PIXELS = 2**29 - 1


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


def _size_of(rle: Any) -> tuple[int, int]:
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise RleError('RLE must be a mapping with "size" and "counts"')
    size = rle["size"]
    if (
        not isinstance(size, Sequence)
        or isinstance(size, (str, bytes))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise RleError(f"RLE size must be [height, width] of positive integers, got {_short(size)}")
    height, width = int(size[0]), int(size[1])
    if height * width > MAX_RLE_PIXELS:
        raise RleError(f"RLE size [{height}, {width}] is over {MAX_RLE_PIXELS} pixels")
    return height, width


def rle_size(rle: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) of a JSON RLE, checked, without touching its counts: size checks go first."""
    return _size_of(rle)


def compressed_runs(counts: bytes) -> np.ndarray:
    """The run lengths (int64 [M]) of COCO's compressed counts string, or RleError.

    pycocotools' C reader (rleFrString) trusts its input: a string ending mid-number reads past
    its end, characters outside '0'..'o' and negative runs turn into huge unsigned runs, and an
    empty string "decodes" to uninitialised memory. So the string is decoded here first, in
    numpy, with every one of those cases refused; only a string that passes reaches the C code.
    Format: each run is 1..6 characters of 6 bits (value = char - 48); bit 0x20 says "more
    follows", 5 bits of payload each, least significant first; bit 0x10 of the last character
    is the sign; runs from the fourth on are stored as the difference to the run two before.
    """
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        raise RleError("RLE counts are empty")
    if chars.min() < 0 or chars.max() > 63:
        raise RleError("RLE counts hold characters outside '0'..'o'")
    last = (chars & 0x20) == 0
    if not last[-1]:
        raise RleError("RLE counts end in the middle of a run")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_RUN_CHARS:
        raise RleError(f"RLE counts hold a run of {int(lengths.max())} characters (at most {_MAX_RUN_CHARS})")
    position = np.arange(chars.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
    negative = (chars[ends] & 0x10) != 0
    values = values - (negative.astype(np.int64) << (5 * lengths))
    runs = values.copy()
    # Delta coding from index 3 on: run[m] = value[m] + run[m - 2] (two chains, odd and even).
    if runs.size > 3:
        runs[3::2] = runs[1] + np.cumsum(values[3::2])
    if runs.size > 4:
        runs[4::2] = runs[2] + np.cumsum(values[4::2])
    if runs.min() < 0:
        raise RleError("RLE counts hold a negative run")
    return runs


def _to_coco(rle: Mapping[str, Any], expected_size: Optional[tuple[int, int]] = None,
             max_pixels: Optional[int] = None) -> dict[str, Any]:
    """Validate a JSON RLE and convert it to the form pycocotools' C functions accept.

    The size is checked against `expected_size` / `max_pixels` before anything else, and the runs
    must cover exactly height x width pixels: nothing malformed ever reaches pycocotools.
    """
    height, width = _size_of(rle)
    if expected_size is not None and (height, width) != tuple(expected_size):
        raise RleError(f"RLE size [{height}, {width}] != frame [{expected_size[0]}, {expected_size[1]}]")
    if max_pixels is not None and height * width > max_pixels:
        raise RleError(f"RLE size [{height}, {width}] is over {max_pixels} pixels")
    counts = rle["counts"]
    if isinstance(counts, str):
        try:
            raw = counts.encode("ascii")
        except UnicodeEncodeError:
            raise RleError("RLE counts must be ASCII (COCO compressed RLE)") from None
        counts = raw
    if isinstance(counts, (bytes, bytearray)):
        runs = compressed_runs(bytes(counts))
        if int(runs.sum()) != height * width:
            raise RleError(f"RLE runs cover {int(runs.sum())} pixels, the mask has {height * width}")
        return {"size": [height, width], "counts": bytes(counts)}
    if isinstance(counts, Sequence):
        # Uncompressed COCO RLE (list of run lengths): check the runs cover the mask exactly.
        runs = list(counts)
        if (not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 2**31 for v in runs)
                or sum(runs) != height * width):
            raise RleError(f"uncompressed RLE counts must be non-negative runs summing to {height * width}")
        return coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    raise RleError(f"RLE counts must be a string or a list of runs, got {type(counts).__name__}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_rle(rle: Mapping[str, Any], expected_size: Optional[tuple[int, int]] = None,
              max_pixels: Optional[int] = None) -> None:
    """Every check of `decode_rle` without decoding: size, then the runs (cheap, no mask allocated)."""
    _to_coco(rle, expected_size, max_pixels)


def decode_rle(rle: Mapping[str, Any], expected_size: Optional[tuple[int, int]] = None,
               max_pixels: Optional[int] = None) -> np.ndarray:
    """Decode COCO RLE (compressed or uncompressed) to a boolean [H, W] mask.

    `expected_size` (height, width) and `max_pixels` are checked before any pixel is allocated;
    every failure is an RleError.
    """
    coco = _to_coco(rle, expected_size, max_pixels)
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
