"""`masklet run`'s output side: masklet records leave from a thread of their own, and every
acknowledgement says which input offsets it settles.

The session calls `submit` from its driver thread (`LiveSession(on_output=...)`); the publisher
thread hands the record to the producer at once, so a record never waits for the consumer's poll
loop (which may sit in a fetch for a poll timeout). Records pass through unchanged: key = stream
id, value = the session's masklet/v1 JSON (`revision` included), so revised records share their
frame's key and partition, after the record they revise.

Every send is registered with what its ack settles (`Settle`) under one lock with the send itself,
so an acknowledgement arriving before the registration is never mistaken for an unknown record.
The consumer thread collects settlements with `settled()`.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settle:
    tokens: tuple = ()                  # ((topic, partition), offset): input offsets done once acked
    stream_id: Optional[str] = None     # for a masklet record: its stream and frame, which settle the
    frame_idx: int = -1                 # stream's prompts for frames at or before it
    forwarded_prompt: bool = False      # a prompt this member forwarded to its home partition


class Publisher:
    def __init__(self, producer: Any, topic: str, *, on_output: Optional[Callable[[Any], None]] = None) -> None:
        self.producer = producer
        self.topic = topic
        self.on_output = on_output
        self.records = 0
        self.failures: "queue.Queue[Any]" = queue.Queue()  # outputs without a record (undecodable frames)
        self._outputs: "queue.Queue[Any]" = queue.Queue()
        self._acks: "queue.Queue[int]" = queue.Queue()
        self._lock = threading.Lock()
        self._by_seq: dict[int, Settle] = {}
        self._busy = 0
        self._forwarded_prompts_unacked = 0
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="masklet-publisher", daemon=True)
        self._thread.start()

    # -- any thread -------------------------------------------------------------------------

    def submit(self, out: Any) -> None:
        """A session output (called on the session's driver thread)."""
        with self._lock:
            self._busy += 1
        self._outputs.put(out)

    def acked(self, seq: int) -> None:
        """The producer's ack callback (its IO thread)."""
        self._acks.put(seq)

    def send(self, topic: str, value: bytes, key: Optional[bytes], headers: list, settle: Settle, **kw: Any) -> int:
        with self._lock:
            seq = self.producer.send(topic, value=value, key=key, headers=headers, **kw)
            self._by_seq[seq] = settle
            if settle.forwarded_prompt:
                self._forwarded_prompts_unacked += 1
        return seq

    def idle(self) -> bool:
        with self._lock:
            return self._busy == 0

    def prompts_in_flight(self) -> bool:
        with self._lock:
            return self._forwarded_prompts_unacked > 0

    # -- the consumer thread ----------------------------------------------------------------

    def settled(self) -> list[Settle]:
        out = []
        while True:
            try:
                seq = self._acks.get_nowait()
            except queue.Empty:
                return out
            with self._lock:
                settle = self._by_seq.pop(seq, None)
                if settle is not None and settle.forwarded_prompt:
                    self._forwarded_prompts_unacked -= 1
            if settle is not None:  # None: a dead letter (done when handed over)
                out.append(settle)

    def close(self, timeout: float = 30.0) -> None:
        self._outputs.put(None)
        self._thread.join(timeout)

    # -- the publisher thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            out = self._outputs.get()
            if out is None:
                return
            try:
                self._publish(out)
            except Exception as exc:  # noqa: BLE001 - ProducerGaveUp: the runner stops on `error`
                log.error("publishing failed: %s", exc)
                self.error = exc
            finally:
                with self._lock:
                    self._busy -= 1

    def _publish(self, out: Any) -> None:
        rec = getattr(out, "record", None)
        if rec is None:
            self.failures.put(out)
            return
        self.send(self.topic, rec.to_json_bytes(), rec.kafka_key(), [("schema", rec.schema_version.encode())],
                  Settle(tuple(out.tokens), rec.stream_id, rec.frame_idx))
        self.records += 1
        if self.on_output is not None:
            self.on_output(out)
