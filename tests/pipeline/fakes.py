"""Deterministic stand-ins for the model and the frame source, following the real APIs exactly.

FakeModel.encode turns each frame into a FrameEmbedding whose image_embed carries the frame's
colours on the S/16 grid. A FakeTracker learns the colour under its prompt and, every step,
masks the grid cells near that colour, then moves its target colour towards the masked mean, so
its output depends on its whole history (which is what snapshot/resume must preserve). Its
low-resolution logits live on that grid; the mask is their bilinear upsampling, as for SAM 2.
FakeModel and FakeTracker are checked against `masklet.model.protocols` (tests/pipeline/test_fakes.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from masklet.model.types import FrameEmbedding, MaskResult, Prompt


@dataclass(frozen=True)
class FakeConfig:
    name: str = "fake"


class FakeModel(torch.nn.Module):
    def __init__(self, image_size: int = 64) -> None:
        super().__init__()
        self.image_size = image_size
        self.config = FakeConfig()
        self.batch_sizes: list[int] = []

    @torch.no_grad()
    def encode(self, frames) -> list[FrameEmbedding]:
        x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # [B,3,H,W]
        self.batch_sizes.append(int(x.shape[0]))
        s = self.image_size
        out = []
        for scale, channels in ((4, 32), (8, 64)):
            grid = F.adaptive_avg_pool2d(x, s // scale)
            out.append(grid.repeat(1, -(-channels // 3), 1, 1)[:, :channels])
        top = F.adaptive_avg_pool2d(x, s // 16)
        top = top.repeat(1, 86, 1, 1)[:, :256]
        return [FrameEmbedding((out[0][i].clone(), out[1][i].clone()), top[i].clone()) for i in range(x.shape[0])]

    def new_tracker(self, video_size: tuple[int, int], num_frames: int | None = None, *,
                    reverse: bool = False) -> "FakeTracker":
        return FakeTracker(self, video_size, direction=-1 if reverse else 1)

    def restore_tracker(self, state: dict) -> "FakeTracker":
        return FakeTracker.from_state(self, state)


class FakeTracker:
    def __init__(self, model: FakeModel, video_size: tuple[int, int], direction: int = 1) -> None:
        self.model = model
        self.video_size = tuple(video_size)
        self.direction = direction
        self.target: torch.Tensor | None = None
        self.last_frame: int | None = None
        self.last_frame_idx: int | None = None  # the protocol's name for it
        self.first_prompt_frame: int | None = None
        self.seed: torch.Tensor | None = None
        self.steps = 0

    def _check_order(self, frame_idx: int) -> None:
        if self.last_frame is not None and (frame_idx - self.last_frame) * self.direction <= 0:
            raise RuntimeError(f"frames must be stepped in order: {frame_idx} after {self.last_frame}")

    def step(self, frame_idx: int, embedding: FrameEmbedding, prompt: Prompt | None = None) -> MaskResult:
        self._check_order(frame_idx)
        colours = embedding.image_embed[:3]  # [3, g, g]
        g = colours.shape[-1]
        if prompt is not None:
            h, w = self.video_size
            if prompt.points is not None:
                x, y = prompt.points[0]
            elif prompt.box is not None:
                x, y = (prompt.box[0] + prompt.box[2]) / 2, (prompt.box[1] + prompt.box[3]) / 2
            else:  # a mask prompt: its centroid
                ys, xs = np.nonzero(prompt.mask)
                x, y = float(xs.mean()), float(ys.mean())
            gx, gy = min(int(x / w * g), g - 1), min(int(y / h * g), g - 1)
            self.target = colours[:, gy, gx].clone()
            if self.first_prompt_frame is None:
                self.first_prompt_frame = frame_idx
                # Like SAM 2's reverse seed, what a backward branch starts from is fixed at the first
                # prompt, so it does not depend on when the branch is taken.
                self.seed = self.target.clone()
        if self.target is None:
            raise RuntimeError("tracker stepped before its first prompt")
        distance = (colours - self.target[:, None, None]).abs().sum(0)
        low = (0.25 - distance) * 40.0  # logits on the grid
        mask = low > 0
        if mask.any():
            self.target = 0.9 * self.target + 0.1 * colours[:, mask].mean(1)
        self.last_frame = frame_idx
        self.last_frame_idx = frame_idx
        self.steps += 1
        score = float(mask.float().mean() * 10 - 0.5)
        return MaskResult(frame_idx=frame_idx, low_res_logits=low[None].float(), score=score,
                          iou=float(mask.float().mean()), video_size=self.video_size,
                          is_conditioning=prompt is not None)

    def refine(self, embedding: FrameEmbedding, prompt: Prompt) -> MaskResult:
        frame, self.last_frame = self.last_frame, None if self.last_frame is None else self.last_frame - self.direction
        return self.step(frame, embedding, prompt)

    def reverse_tracker(self) -> "FakeTracker":
        if self.first_prompt_frame is None:
            raise RuntimeError("reverse_tracker needs a prompted forward tracker")
        rt = FakeTracker(self.model, self.video_size, direction=-1)
        rt.last_frame = self.first_prompt_frame
        rt.first_prompt_frame = self.first_prompt_frame
        rt.target = self.seed.clone()
        rt.seed = self.seed.clone()
        return rt

    def state_dict(self) -> dict:
        return {"video_size": torch.tensor(self.video_size), "direction": self.direction,
                "target": None if self.target is None else self.target.clone(),
                "seed": None if self.seed is None else self.seed.clone(),
                "last_frame": -1 if self.last_frame is None else self.last_frame,
                "first_prompt_frame": -1 if self.first_prompt_frame is None else self.first_prompt_frame,
                "steps": self.steps}

    @classmethod
    def from_state(cls, model: FakeModel, state: dict) -> "FakeTracker":
        t = cls(model, tuple(int(v) for v in state["video_size"]), direction=int(state["direction"]))
        t.target = None if state["target"] is None else torch.as_tensor(state["target"]).clone()
        t.seed = None if state["seed"] is None else torch.as_tensor(state["seed"]).clone()
        t.last_frame = None if state["last_frame"] < 0 else int(state["last_frame"])
        t.last_frame_idx = t.last_frame
        t.first_prompt_frame = None if state["first_prompt_frame"] < 0 else int(state["first_prompt_frame"])
        t.steps = int(state["steps"])
        return t

    def memory_bytes(self) -> int:
        return 0 if self.target is None else self.target.numel() * 4


def build_fake_model(name: str = "fake", checkpoint=None, image_size: int = 64, device: str = "cpu") -> FakeModel:
    return FakeModel(image_size=image_size).eval()


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class FakeFrame:
    frame_idx: int
    pts: float
    rgb: np.ndarray


def synthetic_frames(num_frames: int, height: int = 48, width: int = 64, seed: int = 0) -> list[np.ndarray]:
    """A red square drifting right over a blue-green gradient, with a little seeded noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    out = []
    for i in range(num_frames):
        img = np.zeros((height, width, 3), np.uint8)
        img[..., 1] = (xs * 200 // max(width - 1, 1)).astype(np.uint8)
        img[..., 2] = (ys * 200 // max(height - 1, 1)).astype(np.uint8)
        x0, y0 = 4 + (i * 2) % (width - 20), height // 3
        img[y0:y0 + 14, x0:x0 + 14] = (230, 20, 20)
        img = np.clip(img.astype(np.int16) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
        out.append(img)
    return out


class FakeSource:
    """A FrameSource (same attributes as pipeline.sources') over synthetic frames.

    `fail_at` raises SourceError mid-stream like a truncated file.
    """

    def __init__(self, num_frames: int = 10, height: int = 48, width: int = 64, seed: int = 0,
                 fps: float = 25.0, fail_at: int | None = None, name: str = "fake") -> None:
        self.rgb = synthetic_frames(num_frames, height, width, seed)
        self.fps = fps
        self.fail_at = fail_at
        self.name = name
        self.width, self.height = width, height
        self.frame_count = num_frames
        self.is_live = False

    def frames(self) -> Iterator[FakeFrame]:
        from masklet.actors.sources import SourceError

        for i, rgb in enumerate(self.rgb):
            if self.fail_at is not None and i == self.fail_at:
                raise SourceError(self.name, f"truncated: decoding failed after {i} frames")
            yield FakeFrame(i, i / self.fps, rgb)

    def close(self) -> None:
        pass


def fake_opener(**kwargs):
    """A picklable opener for DecoderActor."""
    import functools

    return functools.partial(FakeSource, **kwargs)
