"""Test shorthand: engine/live configs from flat keywords (executor settings go to `executor`)."""
from __future__ import annotations

from masklet.pipeline.engine_types import EngineConfig
from masklet.pipeline.executor_config import ExecutorConfig
from masklet.pipeline.live_types import LiveConfig

_EXECUTOR_FIELDS = set(ExecutorConfig.__dataclass_fields__)


def _split(kw: dict) -> tuple[ExecutorConfig, dict]:
    executor = {k: kw.pop(k) for k in list(kw) if k in _EXECUTOR_FIELDS}
    return ExecutorConfig(**executor), kw


def engine_cfg(**kw) -> EngineConfig:
    executor, rest = _split(dict(kw))
    return EngineConfig(executor=executor, **rest)


def live_cfg(**kw) -> LiveConfig:
    executor, rest = _split(dict(kw))
    return LiveConfig(executor=executor, **rest)
