"""Cross-topic order in `masklet run`: a frame waits until every prompt sent before it has been read.

Frames and prompts of a stream come from two topics, fetched independently. Kafka Streams has the
same problem for joins and solves it by synchronising input partitions (KIP-353 `max.task.idle.ms`,
KIP-695): it processes a record only once every other input of its task either has buffered data
or is known to be caught up, and waits a bounded time otherwise. Here the rule is narrower because
a prompt names the frame it applies to (the session holds a prompt for a future frame, and applies
one for a recent frame to the frames it buffered): applying a prompt early is harmless, applying
it late is not. So prompts are applied as soon as they are read, and a frame is released only when
its stream's prompts partition is *caught up*:

  * the consumer holds no fetched-but-unread data of that partition,
  * its position has reached the partition's high watermark, and
  * that high watermark came with a fetch response handled no earlier than the one that brought
    the frame (`FetchWitness`). A broker stores a frame after every prompt acknowledged before the
    frame was sent, so a high watermark reported alongside (or after) the frame counts them all.

When that cannot be confirmed within `prompt_wait_ms` (a broker that stopped answering for that
partition, say), the frame goes on and the wait is counted as `timed_out`. A frame whose prompts
partition is assigned to another member (topics with unequal partition counts, a custom assignor)
goes on at once, counted as `unpaired`. In the steady state the check passes in the same step the
frame arrives: no added latency.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from kafka import TopicPartition

from masklet.pipeline.kafka.fetch import fetch_position

log = logging.getLogger(__name__)


class FetchWitness:
    """Counts fetch responses and remembers, per partition, the last response whose request covered it.

    Wraps kafka-python's `Fetcher._handle_fetch_response` (3.0.x: called on the client's IO thread
    with the request's `fetch_offsets`). The stamp is taken after the original handler queued the
    response's data, so "covered by response n" always means "its data is queued or already read".
    Partitions absent from an incremental fetch response (KIP-227) had nothing new: their high
    watermark is still current. With another kafka-python layout `available` is False and the order
    check falls back to high watermark and position alone (KIP-695's rule).
    """

    def __init__(self, consumer: Any) -> None:
        self._lock = threading.Lock()
        self._responses = 0
        self._covered: dict[TopicPartition, int] = {}
        self._fetcher = getattr(consumer, "_fetcher", None)
        original = getattr(self._fetcher, "_handle_fetch_response", None)
        self.available = callable(original) and hasattr(self._fetcher, "_completed_fetches")
        if not self.available:
            log.warning("kafka-python without the expected fetcher internals: cross-topic order falls back to "
                        "high watermarks only")
            return

        def handle(node_id: Any, fetch_offsets: dict, send_time: float, response: Any) -> Any:
            result = original(node_id, fetch_offsets, send_time, response)
            with self._lock:
                self._responses += 1
                for tp in fetch_offsets:
                    self._covered[tp] = self._responses
            return result

        self._fetcher._handle_fetch_response = handle  # noqa: SLF001

    def now(self) -> int:
        with self._lock:
            return self._responses

    def covered_since(self, tp: TopicPartition, stamp: int) -> bool:
        if not self.available:
            return True
        with self._lock:
            return self._covered.get(tp, 0) >= stamp

    def has_unread(self, tp: TopicPartition) -> bool:
        """Fetched data of `tp` that poll() has not handed out yet."""
        if not self.available:
            return False
        pending = [getattr(f, "topic_partition", None) for f in list(self._fetcher._completed_fetches)]  # noqa: SLF001
        current = getattr(self._fetcher, "_next_partition_records", None)
        return tp in pending or bool(current) and getattr(current, "topic_partition", None) == tp


@dataclass
class _Waiting:
    item: Any
    prompts_tp: Optional[TopicPartition]  # None: no prompts partition to wait for
    stamp: int                            # FetchWitness.now() when the frame was read
    arrived: float                        # clock() when the frame was read
    waited: bool = False                  # not released in the step it arrived


class PromptOrder:
    """Per frames partition, a FIFO of frames waiting for their prompts partition to be caught up."""

    def __init__(self, consumer: Any, *, max_wait_s: float, stats: Any = None,
                 clock: Callable[[], float] = time.monotonic, witness: Optional[FetchWitness] = None) -> None:
        self.consumer = consumer
        self.max_wait_s = max_wait_s
        self.stats = stats
        self.clock = clock
        self.witness = witness or FetchWitness(consumer)
        self._queues: dict[int, deque[_Waiting]] = {}
        self._unpaired_warned: set[TopicPartition] = set()

    def add(self, frames_partition: int, item: Any, prompts_tp: Optional[TopicPartition]) -> None:
        self._queues.setdefault(frames_partition, deque()).append(
            _Waiting(item, prompts_tp, self.witness.now(), self.clock()))

    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def next_deadline(self) -> Optional[float]:
        heads = [q[0].arrived + self.max_wait_s for q in self._queues.values() if q]
        return min(heads) if heads else None

    def release(self, room: Optional[int] = None, blocked: bool = False) -> list[Any]:
        """Frames that may go on now, oldest first per partition; at most `room` of them. `blocked`
        holds every frame (prompts this member forwarded are not yet acknowledged)."""
        out: list[Any] = []
        if blocked:
            self._mark_waiting()
            return out
        now = self.clock()
        caught_up: dict[TopicPartition, bool] = {}
        for queue in self._queues.values():
            while queue and (room is None or len(out) < room):
                head = queue[0]
                outcome = self._outcome(head, now, caught_up)
                if outcome is None:
                    break
                queue.popleft()
                if head.waited or outcome != "caught_up":
                    self._count(outcome, now - head.arrived)
                out.append(head.item)
        self._mark_waiting()
        return out

    def forget(self, partitions: Iterable[int]) -> list[Any]:
        """Revoked frames partitions: their waiting frames, dropped here (their offsets are not done)."""
        dropped: list[Any] = []
        for partition in partitions:
            dropped += [w.item for w in self._queues.pop(partition, ())]
        return dropped

    # -- internals --------------------------------------------------------------------------

    def _outcome(self, head: _Waiting, now: float, cache: dict) -> Optional[str]:
        tp = head.prompts_tp
        if tp is None:
            return "unpaired"
        if tp not in self.consumer.assignment():
            if tp not in self._unpaired_warned:
                self._unpaired_warned.add(tp)
                log.warning("prompts partition %s[%d] is not assigned to this member: frames that pair with it "
                            "do not wait for its prompts (give the frames and prompts topics the same number "
                            "of partitions)", tp.topic, tp.partition)
            return "unpaired"
        if tp not in cache:
            cache[tp] = self._caught_up(tp)
        if cache[tp] and self.witness.covered_since(tp, head.stamp):
            return "caught_up"
        if now - head.arrived >= self.max_wait_s:
            return "timed_out"
        return None

    def _caught_up(self, tp: TopicPartition) -> bool:
        if self.witness.has_unread(tp):
            return False
        high = self.consumer.highwater(tp)
        position = fetch_position(self.consumer, tp)
        return high is not None and position is not None and position >= high

    def _mark_waiting(self) -> None:
        for queue in self._queues.values():
            for waiting in queue:
                waiting.waited = True

    def _count(self, outcome: str, waited_s: float) -> None:
        if self.stats is None:
            return
        self.stats.inc("masklet_kafka_prompt_waits_total", outcome=outcome)
        self.stats.observe("masklet_kafka_prompt_wait_seconds", waited_s)
