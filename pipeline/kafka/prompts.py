"""`masklet prompt`: publish one prompt/v1 message to the prompts topic and wait for its ack."""
from __future__ import annotations

from typing import Optional, Sequence

from pydantic import ValidationError

from masklet.pipeline.config import KafkaSettings
from masklet.pipeline.kafka.client import producer_kwargs
from masklet.pipeline.kafka.producer import DeliveryReport, RecoveringProducer
from masklet.actors.messages import MessageError, PromptMessage


def build_prompt(
    stream_id: str,
    object_id: int,
    *,
    frame_idx: int = 0,
    points: Sequence[tuple[float, float]] = (),
    negative_points: Sequence[tuple[float, float]] = (),
    box: Optional[tuple[float, float, float, float]] = None,
    remove: bool = False,
    refine: bool = False,
) -> PromptMessage:
    """A validated prompt; raises MessageError with a one-line reason."""
    action = "remove" if remove else "refine" if refine else "add"
    all_points = list(points) + list(negative_points)
    labels = [1] * len(points) + [0] * len(negative_points)
    try:
        return PromptMessage(stream_id=stream_id, object_id=object_id, frame_idx=frame_idx, action=action,
                             points=all_points, labels=labels, box=box)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'prompt'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors(include_url=False))
        raise MessageError(f"invalid prompt: {problems}") from None


def publish_prompt(prompt: PromptMessage, settings: KafkaSettings, timeout_s: float = 15.0) -> DeliveryReport:
    """Send with the stream id as key (prompts stay ordered per stream); returns the delivery report."""
    producer = RecoveringProducer(producer_kwargs(settings, linger_ms=0), max_recoveries=2)
    try:
        producer.send(settings.topics.prompts, value=prompt.to_json_bytes(), key=prompt.stream_id.encode("utf-8"),
                      headers=[("schema", prompt.schema_version.encode())])
    finally:
        report = producer.close(timeout=timeout_s)
    return report
