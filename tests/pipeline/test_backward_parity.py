"""Backward propagation through the PIPELINE matches the official predictor's `reverse=True` run.

The official SAM2VideoPredictor and our model share the same sharpened random weights (see
tests/model/oracle.py). An object is clicked on frame K > 0 of a real clip. Officially: add the
click at K, propagate forward, then propagate from K with reverse=True. Pipeline: the in-process
engine runs the same clip, with the same click, end to end (decoder, batched encoder, tracker
actor with its forward and backward trackers, publisher, sinks), and every frame's mask logits
must match the official ones within oracle.compare_logits.

Only the encoder's input is stubbed: the engine feeds decoded uint8 frames, the official
predictor its own preprocessing of JPEGs, so the injected model maps each decoded frame to our
model's embedding of the official state's preprocessed image. Everything after the embedding
(the part this test is about) is the real pipeline and the real model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from masklet.actors.payloads import ModelSpec, StreamInfo
from masklet.model.config import get_config
from masklet.model.types import Prompt
from masklet.actors.backend import InProcessBackend
from masklet.pipeline.engine import Engine, StreamSpec
from masklet.actors.sources import DecodedFrame
from tests.pipeline.configs import engine_cfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from oracle import (  # noqa: E402 - needs the path above
    build_official_video_predictor, compare_logits, official_state, ours_from, propagate, read_clip,
)

NAME = "sam2.1_hiera_tiny"
S = 256  # image size, as in the model parity suite
N = 18  # >= 16 frames: SAM 2.1 normalises pointer time offsets by min(num_frames, 16) - 1
K = 7  # the click's frame: frames 0..K-1 exist only through backward propagation
CLICK = [[160.0, 90.0]]
# The criterion. It holds because EmbeddingPayload keeps the encoder's memory layout: with
# C-contiguous copies instead, other conv kernels ran and this test measured up to 2e-3.
PIPELINE_REL_TOL = 1e-3

# The model every actor of the engine gets: ModelSpec.factory names a "module:function", so point
# it at this module (under whatever name pytest imported it) and hand out the prebuilt instance.
_INJECTED: dict[str, Any] = {}


def injected_model(**_spec_fields: Any) -> Any:
    return _INJECTED["model"]


class PreprocessedClipModel:
    """Our model, except that `encode` looks each decoded frame up and returns our model's
    embedding of the official predictor's preprocessed image of that frame."""

    def __init__(self, model: Any, frames: list[np.ndarray], images: Any) -> None:
        self.model = model
        self.frame_index = {frame.tobytes(): i for i, frame in enumerate(frames)}
        assert len(self.frame_index) == len(frames), "clip has identical frames; the lookup would be ambiguous"
        self.embeddings = [model.encode(images[i:i + 1])[0] for i in range(len(frames))]

    def encode(self, frames: np.ndarray) -> list:
        return [self.embeddings[self.frame_index[np.ascontiguousarray(f).tobytes()]] for f in frames]

    def eval(self) -> "PreprocessedClipModel":
        return self

    def __getattr__(self, name: str) -> Any:  # new_tracker, parameters, config, ... of the real model
        return getattr(self.model, name)


@dataclass
class ClipSource:
    """A FrameSource over frames already in memory (pipeline.sources' interface)."""

    rgb: list[np.ndarray]
    name: str = "clip.mp4"
    fps: float = 25.0
    is_live: bool = False

    def __post_init__(self) -> None:
        self.height, self.width = self.rgb[0].shape[:2]
        self.frame_count = len(self.rgb)

    def frames(self) -> Iterator[DecodedFrame]:
        for i, rgb in enumerate(self.rgb):
            yield DecodedFrame(i, i / self.fps, rgb, (self.width, self.height))

    def close(self) -> None:
        pass


class LogitsSink:
    """Keeps each frame's soft logits per object, as the publisher hands them to its sinks."""

    name = "logits"

    def __init__(self, into: dict) -> None:
        self.into = into

    def open(self) -> None:
        return None

    def write(self, frame) -> None:
        self.into[frame.record.frame_idx] = {oid: np.array(l) for oid, l in frame.logits.items()}

    def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def frames(video_paths):
    return read_clip(video_paths[0], N)


def test_pipeline_backward_propagation_matches_official_reverse_run(frames, tmp_path):
    import torch

    official = build_official_video_predictor(NAME, S)
    ours = ours_from(official, NAME, S)
    state, images = official_state(official, frames, tmp_path)
    official.add_new_points_or_box(state, frame_idx=K, obj_id=1, points=CLICK, labels=[1])
    ref_forward = propagate(official, state)
    ref_reverse = propagate(official, state, start_frame_idx=K, reverse=True)
    expected = {f: ref_reverse[f][0] for f in range(K)} | {f: ref_forward[f][0] for f in range(K, N)}
    assert sorted(expected) == list(range(N))

    _INJECTED["model"] = PreprocessedClipModel(ours, frames, images)
    spec = ModelSpec(NAME, None, S, "cpu", factory=f"{__name__}:injected_model")
    # The backward tracker branches off once the forward one has stepped K + max_obj_ptrs - 1 frames
    # (or the clip ended), as `masklet segment` configures it for the real model.
    delay = get_config(NAME, image_size=S).max_obj_ptrs_in_encoder - 1
    config = engine_cfg(max_batch_size=4, max_wait_ms=0, soft_masks=True, backward_delay=delay)
    got: dict[int, dict] = {}
    objects = {1: {K: Prompt(points=CLICK, labels=[1])}}

    def sinks(info: StreamInfo) -> list:
        assert (info.width, info.height) == (state["video_width"], state["video_height"])
        return [LogitsSink(got)]

    engine = Engine(InProcessBackend(), spec, config)
    try:
        report = engine.run([StreamSpec("clip", lambda: ClipSource(frames), objects, sinks, bidirectional=True)])
    finally:
        engine.shutdown()
        _INJECTED.clear()

    outcome = report.streams["clip"]
    assert outcome.ok, outcome.error or outcome.sink_errors
    assert sorted(got) == list(range(N)), "one published frame per input frame"
    worst = 0.0
    for f in range(N):
        assert sorted(got[f]) == [1], f"frame {f}: objects {sorted(got[f])}"
        direction = "backward" if f < K else "forward"
        rel, _ = compare_logits(torch.from_numpy(got[f][1]), expected[f], f"pipeline {direction} frame {f}",
                                rel_tol=PIPELINE_REL_TOL)
        worst = max(worst, rel)
    # Not vacuous: the backward frames are tracked with memory, so they differ from frame K's mask.
    assert not np.allclose(got[0][1], got[K][1])
    print(f"pipeline vs official reverse=True run: worst rel diff {worst:.3g} over {N} frames")
