"""Settings -> the configs the code runs with, in one place: the model spec, the executor, the
offline engine and the live session. `masklet segment`, `run` and `serve` all map through here,
so a setting means the same everywhere (one max_batch_size default, one placement policy)."""
from __future__ import annotations

from typing import Any, Optional

from masklet.actors.payloads import ModelSpec
from masklet.pipeline.config import DEFAULT_MODEL_FACTORY, MaskletSettings
from masklet.pipeline.engine_types import EngineConfig
from masklet.pipeline.executor_config import ExecutorConfig
from masklet.pipeline.live_types import LiveConfig

# How much of one GPU each role asks Ray for when the device is CUDA: the encoder and the trackers
# of one shard share one GPU (fractions), so they are scheduled onto the same device.
ENCODER_GPU_SHARE = 0.5
TRACKER_GPU_SHARE = 0.01


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_spec(settings: MaskletSettings) -> ModelSpec:
    """The model every actor builds. Our factory's "auto" checkpoint is downloaded (once, cached)
    here, in the driver, so actors never race to download; plug-in factories get the string as is.

    Raises model.checkpoints.CheckpointError (one line) when weights cannot be had, ValueError (one
    line) when the factory cannot be imported: both before any actor starts.
    """
    m = settings.model
    checkpoint: Optional[str] = None if m.checkpoint == "random" else m.checkpoint
    if m.factory == DEFAULT_MODEL_FACTORY and checkpoint is not None:
        from masklet.model.checkpoints import resolve_checkpoint

        resolved = resolve_checkpoint(m.name, checkpoint)
        checkpoint = None if resolved is None else str(resolved)
    spec = ModelSpec(m.name, checkpoint, m.image_size, resolve_device(m.device), factory=m.factory,
                     precision=m.precision)
    spec.factory_function()
    return spec


def executor_config(settings: MaskletSettings, model: ModelSpec, **overrides: Any) -> ExecutorConfig:
    ps = settings.pipeline
    gpu = model.device.startswith("cuda")
    values: dict[str, Any] = dict(
        max_batch_size=ps.max_batch_size, max_wait_ms=ps.max_wait_ms, objects_per_tracker=ps.objects_per_tracker,
        max_step_batch=ps.max_step_batch,
        streams_per_decoder=ps.streams_per_decoder, streams_per_publisher=ps.streams_per_publisher,
        publishers_before_sharing=ps.publishers_before_sharing,
        encoder_gpus=ENCODER_GPU_SHARE if gpu else 0.0, tracker_gpus=TRACKER_GPU_SHARE if gpu else 0.0,
        max_pixels=ps.max_pixels,
        # On a GPU the encoder and the trackers share one process, so embeddings stay on the device.
        colocate=gpu if ps.colocate == "auto" else ps.colocate == "on")
    values.update(overrides)
    return ExecutorConfig(**values)


def backward_delay_for(model: ModelSpec) -> int:
    """Forward frames after the first prompt that seed the backward tracker's memory (SAM 2 reads up
    to max_obj_ptrs_in_encoder - 1 of them); plug-in models seed from the prompt alone."""
    if model.factory != DEFAULT_MODEL_FACTORY:
        return 0
    from masklet.model.config import get_config

    return get_config(model.name, image_size=model.image_size).max_obj_ptrs_in_encoder - 1


def engine_config(settings: MaskletSettings, model: ModelSpec, *, soft_masks: bool = False,
                  **executor_overrides: Any) -> EngineConfig:
    ps = settings.pipeline
    return EngineConfig(executor=executor_config(settings, model, **executor_overrides),
                        queue_capacity=ps.queue_capacity, replay_frames=ps.replay_buffer_frames,
                        snapshot_every=ps.snapshot_every_n_frames, backward_delay=backward_delay_for(model),
                        soft_masks=soft_masks)


def live_config(settings: MaskletSettings, model: ModelSpec, *, queue_capacity: Optional[int] = None,
                ring_buffer_frames: Optional[int] = None, max_streams: Optional[int] = None,
                **executor_overrides: Any) -> LiveConfig:
    ps = settings.pipeline
    snapshot_every = ps.snapshot_every_n_frames
    return LiveConfig(executor=executor_config(settings, model, **executor_overrides),
                      queue_capacity=queue_capacity or LiveConfig.queue_capacity,
                      ring_buffer_frames=max(ring_buffer_frames or LiveConfig.ring_buffer_frames, snapshot_every),
                      snapshot_every=snapshot_every, max_streams=max_streams or settings.serve.max_streams,
                      limits=settings.limits.input_limits())
