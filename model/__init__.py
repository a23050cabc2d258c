"""SAM 2 / SAM 2.1 for streaming video: build a model, encode frames in batches, track objects.

    from masklet.model import build_model, Prompt
    m = build_model("sam2.1_hiera_tiny", checkpoint="auto", image_size=1024, device="cpu")
    emb = m.encode(frames_uint8)                      # [B, H, W, 3] -> list[FrameEmbedding]
    t = m.new_tracker(video_size=(H, W))
    first = t.step(0, emb[0], Prompt(points=[[x, y]], labels=[1]))
    nxt = t.step(1, emb[1])                           # MaskResult: low_res_logits; .logits/.mask on demand
    results = m.step_many([StepRequest(t, 2, emb[2]), StepRequest(t2, 2, emb[2])])  # one pass, many objects

Plug-in models: see masklet.model.protocols (SegmentationModel, Tracker, BatchedStepModel).
"""
from .batched_step import StepRequest, StepRequestError, step_many
from .build import build_model
from .config import ModelConfig, available_models, get_config
from .image_predictor import segment_image
from .memory_bank import MemoryBank, MemoryEntry
from .protocols import BatchedStepModel, SegmentationModel, Tracker
from .sam2 import SAM2Model
from .tracker import ObjectTracker
from .types import FrameEmbedding, MaskResult, Prompt

__all__ = [
    "build_model", "available_models", "get_config", "ModelConfig", "SAM2Model", "ObjectTracker",
    "MemoryBank", "MemoryEntry", "FrameEmbedding", "MaskResult", "Prompt", "segment_image",
    "StepRequest", "StepRequestError", "step_many", "SegmentationModel", "Tracker", "BatchedStepModel",
]
