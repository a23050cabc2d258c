"""Bounded queues with named overflow policies, and the encoder's cross-stream dynamic batcher.

Both are plain data structures driven by the engine loop, with the clock passed in, so their
behaviour is tested without threads or sleeps.
"""
from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class OverflowPolicy(str, enum.Enum):
    WAIT = "wait"                # files and archives: the producer waits, nothing is ever dropped
    DROP_OLDEST = "drop_oldest"  # live sources: the stalest item makes room and is counted


class QueueFull(RuntimeError):
    """A WAIT queue was offered an item while full; the caller should have checked `has_room`."""


class BoundedQueue(Generic[T]):
    """FIFO with a capacity and an overflow policy; every drop is counted by reason."""

    def __init__(self, capacity: int, policy: OverflowPolicy = OverflowPolicy.WAIT) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.policy = OverflowPolicy(policy)
        self._items: deque[T] = deque()
        self.dropped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    @property
    def has_room(self) -> bool:
        return len(self._items) < self.capacity

    def put(self, item: T) -> T | None:
        """Append `item`; returns the item dropped to make room (DROP_OLDEST), else None."""
        dropped = None
        if not self.has_room:
            if self.policy is OverflowPolicy.WAIT:
                raise QueueFull(f"queue of {self.capacity} is full under the WAIT policy")
            dropped = self._items.popleft()
            self.dropped["queue_full"] += 1
        self._items.append(item)
        return dropped

    def get(self) -> T:
        return self._items.popleft()

    def peek(self) -> T:
        return self._items[0]


@dataclass(frozen=True)
class BatchItem(Generic[T]):
    payload: T
    enqueued_at: float


class DynamicBatcher(Generic[T]):
    """nvstreammux-style batching across streams.

    A batch is released when `max_batch_size` frames are waiting, when the oldest waiting frame
    has waited `max_wait_ms`, or when `flush` is set (no more input can arrive soon, so waiting
    only adds latency). Frames keep their arrival order, so each stream's frames stay in order.
    """

    def __init__(self, max_batch_size: int = 4, max_wait_ms: float = 5.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._waiting: deque[BatchItem[T]] = deque()
        self.released_sizes: list[int] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, payload: T, now: float) -> None:
        self._waiting.append(BatchItem(payload, now))

    def requeue_front(self, payloads: list[T], now: float) -> None:
        """Put a failed batch back at the head (encoder restart), keeping its order."""
        for payload in reversed(payloads):
            self._waiting.appendleft(BatchItem(payload, now - self.max_wait_s))

    def remove(self, predicate) -> int:
        """Drop waiting payloads matching `predicate` (a dropped frame, a failed stream)."""
        before = len(self._waiting)
        self._waiting = deque(item for item in self._waiting if not predicate(item.payload))
        return before - len(self._waiting)

    def deadline(self) -> float | None:
        """When the oldest waiting frame times out, for the loop's sleep; None if empty."""
        return self._waiting[0].enqueued_at + self.max_wait_s if self._waiting else None

    def next_batch(self, now: float, flush: bool = False) -> list[T] | None:
        if not self._waiting:
            return None
        full = len(self._waiting) >= self.max_batch_size
        timed_out = now >= self._waiting[0].enqueued_at + self.max_wait_s
        if not (full or timed_out or flush):
            return None
        size = min(self.max_batch_size, len(self._waiting))
        batch = [self._waiting.popleft().payload for _ in range(size)]
        self.released_sizes.append(size)
        return batch
