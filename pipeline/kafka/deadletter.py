"""Dead-letter records (`pipeline.messages.DeadLetter`, deadletter/v1): what was refused and why.

The stream goes on after a dead letter. The refused payload is never re-published (it may be a
pickle or an image bomb); the record carries its size and SHA-256 in `detail` instead. The key
is the original key, so a stream's dead letters stay together and in order.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

from masklet.actors.messages import DeadLetter, DeadLetterReason

DEADLETTER_SCHEMA = "deadletter/v1"


class Rejected(Exception):
    """A message refused for the dead-letter topic.

    `reason` is one of the shared `DeadLetterReason` codes (dashboards and alerts key on them);
    `kind` is the finer cause (pickle_payload, content_type_mismatch, out_of_range, ...), and it
    leads the `detail` text of the dead-letter record.
    """

    def __init__(self, reason: DeadLetterReason, kind: str, detail: str) -> None:
        super().__init__(f"{reason}/{kind}: {detail}")
        self.reason = reason
        self.kind = kind
        self.detail = detail


def dead_letter_for(rejected: Rejected, *, source_topic: str, payload: Optional[bytes], key: Optional[bytes] = None,
                    headers: Optional[list[tuple[str, bytes]]] = None, partition: Optional[int] = None,
                    offset: Optional[int] = None) -> DeadLetter:
    payload = payload or b""
    detail = (f"{rejected.kind}: {rejected.detail[:400]} "
              f"[payload {len(payload)} bytes, sha256 {hashlib.sha256(payload).hexdigest()}]")
    return DeadLetter(
        reason=rejected.reason,
        detail=detail,
        source_topic=source_topic,
        source_partition=partition,
        source_offset=offset,
        stream_id=key.decode("utf-8", "replace") if key else None,
        original_headers=DeadLetter.headers_as_text(headers),
    )


class DeadLetterPublisher:
    """Sends dead letters to the dead-letter topic and counts them by reason."""

    def __init__(self, producer: Any, topic: str = "masklet.deadletter", stats: Any = None) -> None:
        self.producer = producer  # RecoveringProducer or anything with send(topic, value, key, headers)
        self.topic = topic
        self.stats = stats
        self.counts: dict[str, int] = {}

    def publish(self, rejected: Rejected, *, source_topic: str, payload: Optional[bytes],
                key: Optional[bytes] = None, headers: Optional[list[tuple[str, bytes]]] = None,
                partition: Optional[int] = None, offset: Optional[int] = None) -> DeadLetter:
        letter = dead_letter_for(rejected, source_topic=source_topic, payload=payload, key=key, headers=headers,
                                 partition=partition, offset=offset)
        self.producer.send(self.topic, value=letter.to_json_bytes(), key=key,
                           headers=[("schema", DEADLETTER_SCHEMA.encode()), ("reason", letter.reason.encode())])
        self.counts[letter.reason] = self.counts.get(letter.reason, 0) + 1
        if self.stats is not None:
            self.stats.inc("masklet_deadletter_total", reason=letter.reason)
        return letter
