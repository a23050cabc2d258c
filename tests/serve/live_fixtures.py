"""The real LiveSession for end-to-end tests: random weights, image_size 256, in-process backend."""
from __future__ import annotations


def real_live_session():
    from masklet.actors.payloads import ModelSpec
    from masklet.actors.backend import InProcessBackend
    from masklet.pipeline.executor_config import ExecutorConfig
    from masklet.pipeline.live import LiveConfig, LiveSession

    model = ModelSpec("sam2.1_hiera_tiny", None, 256, "cpu")
    config = LiveConfig(executor=ExecutorConfig(max_batch_size=4, max_wait_ms=5.0), queue_capacity=4,
                        ring_buffer_frames=32, max_streams=4)
    return LiveSession(InProcessBackend(), model, config)
