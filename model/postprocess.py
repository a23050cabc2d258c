"""Mask post-processing that the official predictor runs through a CUDA-only kernel.

Official SAM 2 fills small background holes with a CUDA connected-components op and silently skips
it when the op is unavailable (any CPU install). This is a portable CPU implementation, so the
setting means the same thing on every machine.
"""
from __future__ import annotations

import numpy as np
import torch

HOLE_FILL_LOGIT = 0.1  # small positive score written into filled holes (official value)


def _label_components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a bool [H, W] image -> (labels [H, W] with 0 = off, areas per label)."""
    h, w = binary.shape
    labels = np.zeros((h, w), dtype=np.int64)
    parent = [0]

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # Union-find over horizontal runs: a run touches runs of the previous row that overlap it
    # when widened by one pixel on each side (8-connectivity).
    prev_runs: list[tuple[int, int, int]] = []
    for y in range(h):
        row = binary[y]
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row.view(np.uint8), [0]))))
        runs = []
        for start, stop in zip(edges[::2], edges[1::2]):
            label = 0
            for p_start, p_stop, p_label in prev_runs:
                if p_start <= stop and p_stop >= start:  # overlap of [start-1, stop] with [p_start, p_stop-1]
                    if label == 0:
                        label = find(p_label)
                    else:
                        a, b = find(label), find(p_label)
                        if a != b:
                            parent[max(a, b)] = min(a, b)
                            label = min(a, b)
            if label == 0:
                label = len(parent)
                parent.append(label)
            labels[y, start:stop] = label
            runs.append((start, stop, label))
        prev_runs = runs
    roots = np.array([find(i) for i in range(len(parent))])
    labels = roots[labels]
    areas = np.bincount(labels.ravel(), minlength=len(parent))
    areas[0] = 0
    return labels, areas


def fill_holes(mask_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Turn background components (logit <= 0) of area <= max_area into foreground. [N, 1, H, W] -> same."""
    if max_area <= 0:
        return mask_logits
    out = mask_logits.clone()
    background = (mask_logits <= 0).cpu().numpy()
    for n in range(background.shape[0]):
        labels, areas = _label_components(background[n, 0])
        is_hole = (labels > 0) & (areas[labels] <= max_area)
        if is_hole.any():
            out[n, 0][torch.from_numpy(is_hole).to(out.device)] = HOLE_FILL_LOGIT
    return out
