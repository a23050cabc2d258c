"""A Kafka producer that survives broker restarts and says exactly what it could not deliver.

kafka-python retries retriable errors by itself, but some failures are terminal for a producer
instance (measured on Tansu: the idempotent producer fails every send with UnknownError from
InitProducerId after a broker restart). `RecoveringProducer` therefore keeps every record until
the broker acknowledges it; on a terminal error it throws the instance away, builds a new one and
resends what is unacknowledged, in send order, a bounded number of times.

Delivery is at-least-once: a resent record may be stored twice, and consumers de-duplicate by
key and headers (for frames: stream id and frame_idx). With the default config (no idempotence,
one request in flight) a partition keeps send order across a broker restart; a record resent
after a recovery can still land behind newer ones when the old instance delivered those while
failing it, which consumers see as a late frame_idx. A memory-only broker that restarts also
forgets records it had acknowledged; the producer notices (a partition's offsets start over) and
reports those in `DeliveryReport.acked_then_lost_by_broker`, since no client can resend them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kafka import KafkaProducer
from kafka import errors as kerr

log = logging.getLogger(__name__)

# Resending cannot fix these: the record itself (or our rights to the topic) is the problem.
_RECORD_ERRORS = (
    kerr.MessageSizeTooLargeError,
    kerr.InvalidTopicError,
    kerr.TopicAuthorizationFailedError,
    kerr.InvalidRecordError,
)


class ProducerGaveUp(RuntimeError):
    """Recovery attempts are exhausted; `report` lists what was delivered and what was lost."""

    def __init__(self, message: str, report: "DeliveryReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class LostRecord:
    seq: int
    topic: str
    key: Optional[bytes]
    error: str


@dataclass
class DeliveryReport:
    sent: int = 0
    acked: int = 0
    resent: int = 0
    recoveries: int = 0
    broker_resets: int = 0
    acked_then_lost_by_broker: int = 0
    lost: list[LostRecord] = field(default_factory=list)
    unacked: int = 0

    @property
    def complete(self) -> bool:
        return not self.lost and not self.unacked and not self.acked_then_lost_by_broker

    def summary(self) -> str:
        return (f"sent={self.sent} acked={self.acked} resent={self.resent} recoveries={self.recoveries} "
                f"lost={len(self.lost)} unacked={self.unacked} broker_resets={self.broker_resets} "
                f"acked_then_lost_by_broker={self.acked_then_lost_by_broker}")


@dataclass
class _Pending:
    seq: int
    topic: str
    value: bytes
    key: Optional[bytes]
    headers: list[tuple[str, bytes]]
    generation: int = 0
    partition: Optional[int] = None     # None: the partitioner's choice (murmur2 of the key)
    timestamp_ms: Optional[int] = None  # None: the send time


class RecoveringProducer:
    def __init__(
        self,
        producer_config: dict[str, Any],
        *,
        max_recoveries: int = 5,
        recovery_backoff_s: float = 0.5,
        max_unacked_bytes: int = 256 * 1024 * 1024,
        stats: Any = None,
        producer_factory: Callable[..., Any] = KafkaProducer,
        on_ack: Optional[Callable[[int, Any], None]] = None,
    ) -> None:
        self._config = dict(producer_config)
        self._factory = producer_factory
        self.max_recoveries = max_recoveries
        self.recovery_backoff_s = recovery_backoff_s
        self.max_unacked_bytes = max_unacked_bytes
        self.stats = stats
        self.on_ack = on_ack
        self.report = DeliveryReport()
        self._lock = threading.Lock()
        self._recover_lock = threading.Lock()  # one recovery at a time when several threads send
        self._pending: "OrderedDict[int, _Pending]" = OrderedDict()
        self._unacked_bytes = 0
        self._failures: dict[int, BaseException] = {}
        self._next_seq = 0
        self._generation = 0
        self._failed_attempts_in_a_row = 0
        # Per partition: highest acknowledged offset and how many of our records it holds.
        self._high_offset: dict[tuple[str, int], int] = {}
        self._acked_on_partition: dict[tuple[str, int], int] = {}
        self._gave_up: Optional[ProducerGaveUp] = None
        self._producer = self._factory(**self._config)

    # -- public API -------------------------------------------------------------------------

    def send(self, topic: str, value: bytes, key: Optional[bytes] = None,
             headers: Optional[list[tuple[str, bytes]]] = None, *, partition: Optional[int] = None,
             timestamp_ms: Optional[int] = None) -> int:
        """Queue one record; returns its sequence number. Raises ProducerGaveUp when recovery is exhausted.

        `partition` and `timestamp_ms` are kept for resends (`masklet run` forwards a record that
        another partitioner misplaced to its stream's partition, with its original timestamp)."""
        self._raise_if_gave_up()
        self._recover_if_needed()
        self._wait_for_room()
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            record = _Pending(seq, topic, value, key, list(headers or []), self._generation, partition, timestamp_ms)
            self._pending[seq] = record
            self._unacked_bytes += len(value)
            self.report.sent += 1
        self._dispatch(record)
        return seq

    def flush(self, timeout: float = 60.0) -> DeliveryReport:
        """Wait until every record is acknowledged or lost; what is still pending at the deadline is
        reported as unacked (and left pending, so a later flush can still deliver it)."""
        self._raise_if_gave_up()
        deadline = time.monotonic() + timeout
        while True:
            self._recover_if_needed()
            with self._lock:
                if not self._pending:
                    break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._producer.flush(timeout=min(remaining, 1.0))
            except kerr.KafkaTimeoutError:
                pass
            except kerr.KafkaError as exc:
                self._mark_all_failed(exc)
        with self._lock:
            self.report.unacked = len(self._pending)
        return self.report

    def close(self, timeout: float = 10.0) -> DeliveryReport:
        if self._gave_up is not None:
            return self.report
        report = self.flush(timeout)
        try:
            self._producer.close(timeout=1.0)
        except Exception:  # a broken instance may fail to close; nothing is left to deliver through it
            log.debug("closing kafka producer failed", exc_info=True)
        return report

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- internals --------------------------------------------------------------------------

    def _raise_if_gave_up(self) -> None:
        if self._gave_up is not None:
            raise self._gave_up

    def _dispatch(self, record: _Pending) -> None:
        generation = record.generation
        try:
            future = self._producer.send(record.topic, value=record.value, key=record.key, headers=record.headers,
                                         partition=record.partition, timestamp_ms=record.timestamp_ms)
        except (kerr.KafkaError, AssertionError) as exc:
            # Raised synchronously: metadata unavailable (max_block_ms), producer in a fatal state, ...
            self._on_error(record.seq, generation, exc)
            return
        future.add_callback(self._on_success, record.seq, generation)
        future.add_errback(self._on_error, record.seq, generation)

    def _on_success(self, seq: int, generation: int, metadata: Any) -> None:
        with self._lock:
            record = self._pending.get(seq)
            if record is None or record.generation != generation:
                return
            del self._pending[seq]
            self._unacked_bytes -= len(record.value)
            self.report.acked += 1
            self._failed_attempts_in_a_row = 0
            self._note_offset(metadata.topic, metadata.partition, metadata.offset)
        if self.on_ack is not None:
            self.on_ack(seq, metadata)

    def _note_offset(self, topic: str, partition: int, offset: int) -> None:
        tp = (topic, partition)
        if offset <= self._high_offset.get(tp, -1):
            # Offsets never go backwards on a live log: the broker lost its storage (restart).
            self.report.broker_resets += 1
            self.report.acked_then_lost_by_broker += self._acked_on_partition.get(tp, 0)
            self._acked_on_partition[tp] = 0
            log.warning("broker log of %s[%d] started over at offset %d; %d acknowledged records are gone",
                        topic, partition, offset, self.report.acked_then_lost_by_broker)
        self._high_offset[tp] = offset
        self._acked_on_partition[tp] = self._acked_on_partition.get(tp, 0) + 1

    def _on_error(self, seq: int, generation: int, exc: BaseException) -> None:
        with self._lock:
            record = self._pending.get(seq)
            if record is None or record.generation != generation:
                return
            if isinstance(exc, _RECORD_ERRORS):
                del self._pending[seq]
                self._unacked_bytes -= len(record.value)
                self.report.lost.append(LostRecord(seq, record.topic, record.key, repr(exc)))
                return
            self._failures[seq] = exc

    def _mark_all_failed(self, exc: BaseException) -> None:
        with self._lock:
            for seq in self._pending:
                self._failures.setdefault(seq, exc)

    def _wait_for_room(self) -> None:
        deadline = time.monotonic() + self._config.get("delivery_timeout_ms", 120_000) / 1000
        while True:
            with self._lock:
                if self._unacked_bytes < self.max_unacked_bytes or not self._pending:
                    return
            if time.monotonic() > deadline:
                self._mark_all_failed(kerr.KafkaTimeoutError("unacknowledged buffer did not drain"))
                deadline = time.monotonic() + self._config.get("delivery_timeout_ms", 120_000) / 1000
            self._recover_if_needed()
            time.sleep(0.002)

    def _recover_if_needed(self) -> None:
        with self._recover_lock:
            with self._lock:
                if not self._failures:
                    return
                first_error = next(iter(self._failures.values()))
            self._recover(first_error)

    def _recover(self, cause: BaseException) -> None:
        while True:
            self._failed_attempts_in_a_row += 1
            if self._failed_attempts_in_a_row > self.max_recoveries:
                self._give_up(cause)
            log.warning("kafka producer failed (%r); recreating it (attempt %d of %d)",
                        cause, self._failed_attempts_in_a_row, self.max_recoveries)
            self.report.recoveries += 1
            if self.stats is not None:
                self.stats.inc("masklet_reconnects_total", source_type="kafka")
            old, self._producer = self._producer, None
            self._stop(old)
            time.sleep(self.recovery_backoff_s * min(2 ** (self._failed_attempts_in_a_row - 1), 16))
            try:
                self._producer = self._factory(**self._config)
            except Exception as exc:  # broker still down: NoBrokersAvailable and friends
                cause = exc
                continue
            with self._lock:
                self._generation += 1
                self._failures.clear()
                resend = list(self._pending.values())
                for record in resend:
                    record.generation = self._generation
                self.report.resent += len(resend)
            for record in resend:
                self._dispatch(record)
            return

    @staticmethod
    def _stop(producer: Any) -> None:
        """Force-close and wait for the sender thread: force_close() only signals it, and a sender
        still retrying old batches would interleave them with the resent records."""
        try:
            producer.close(timeout=0)
        except Exception:
            log.debug("closing the failed producer raised", exc_info=True)
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.join(timeout=10)

    def _give_up(self, cause: BaseException) -> None:
        with self._lock:
            for record in self._pending.values():
                self.report.lost.append(LostRecord(record.seq, record.topic, record.key, repr(cause)))
            self._pending.clear()
            self._failures.clear()
            self._unacked_bytes = 0
            self.report.unacked = 0
        self._gave_up = ProducerGaveUp(f"kafka producer gave up after {self.max_recoveries} recoveries: "
                                       f"{cause!r}; {self.report.summary()}", self.report)
        raise self._gave_up
