"""Flow control of `masklet run`'s frames partitions: pause/resume, the stall watchdog, the fetch
wait, and lag.

Kept apart from the runner because each piece works around a measured quirk of kafka-python
3.0.12 against Tansu, and they share one piece of state: the next offset to consume per partition.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from kafka import TopicPartition

log = logging.getLogger(__name__)


class FramesFetch:
    def __init__(self, consumer: Any, frames_topic: str, report: Any) -> None:
        self.consumer = consumer
        self.topic = frames_topic
        self.report = report                               # counts `parked_restores`
        self.paused = False
        self._next_offset: dict[TopicPartition, int] = {}  # next offset to consume
        self.fetch_wait_ms: Optional[int] = None           # as last set by `set_fetch_wait`

    def partitions(self) -> list[TopicPartition]:
        return [tp for tp in self.consumer.assignment() if tp.topic == self.topic]

    def consumed(self, record: Any) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self._next_offset[tp] = record.offset + 1

    def forget(self, revoked: Iterable[TopicPartition]) -> None:
        for tp in revoked:
            self._next_offset.pop(tp, None)
        self.paused = False  # a new assignment starts unpaused

    def pause_or_resume(self, full: bool) -> None:
        """`--overload pause`: stop fetching frames while the runner's backlog is full."""
        tps = self.partitions()
        if not tps:
            return
        if full and not self.paused:
            self.consumer.pause(*tps)
            self.paused = True
        elif not full and self.paused:
            self.consumer.resume(*tps)
            self.paused = False
            self._restore_parked_records()
            # Measured on Tansu: after a pause/resume kafka-python sometimes kept the position but
            # never fetched again (4 of 40 frames, then nothing for 40 s). Seeking to the next
            # unconsumed offset resets the partition's fetch state; records fetched while paused
            # were discarded by kafka-python, so nothing is skipped or read twice.
            for tp in tps:
                if tp in self._next_offset:
                    self.consumer.seek(tp, self._next_offset[tp])

    def set_fetch_wait(self, wait_ms: int) -> bool:
        """Change how long the broker may hold this consumer's next fetches (the profile's
        `fetch_max_wait_ms` or, while the session is behind, `busy_fetch_max_wait_ms`).

        kafka-python reads the value from its fetcher's config each time it builds a fetch request
        and has no public setter; tests/kafka/test_kafka_fetch_wait.py checks that this is still
        so. Returns False (and changes nothing) on a kafka-python without that config."""
        if wait_ms == self.fetch_wait_ms:
            return True
        config = getattr(getattr(self.consumer, "_fetcher", None), "config", None)
        if not isinstance(config, dict) or "fetch_max_wait_ms" not in config:
            return False
        config["fetch_max_wait_ms"] = wait_ms
        self.fetch_wait_ms = wait_ms
        self.report.fetch_wait_changes += 1
        return True

    def _restore_parked_records(self) -> None:
        """Work around a kafka-python 3.0.12 bug that stalls a resumed partition forever.

        Records already fetched for a partition when it is paused are parked (KAFKA-7548) and
        given back on resume only `if fetcher._next_partition_records is None`; but once the
        records in that slot are used up it holds an empty, falsy PartitionRecords, never None.
        The parked records then never come back, and as long as they are parked the partition is
        never fetched again. Measured: the restarted run of test_kafka_run's SIGKILL test stayed
        at offset 23 of 36 for minutes (CI, and 2 of 6 runs here); seeking did not help. Emptying
        the used-up slot lets the next poll restore them (as kafka-python intends)."""
        fetcher = getattr(self.consumer, "_fetcher", None)
        current = getattr(fetcher, "_next_partition_records", None)
        if current is not None and not current:
            fetcher._next_partition_records = None  # noqa: SLF001
            self.report.parked_restores += 1

    def lag(self, open_positions: dict[tuple[str, int], int]) -> int:
        """Frames not yet done, summed over our frames partitions.

        Per partition: the high watermark minus the lowest offset not yet done (`open_positions`,
        the position the next commit would store; frames fetched but still in the backlog or the
        session count as lag), or the consumer's fetch position where nothing was consumed there
        yet. The high watermark is `consumer.highwater(tp)`, the one carried by fetch responses:
        Tansu answers ListOffsets wrongly (measured: `end_offsets()` gave 1 for a partition holding
        50 records, while `highwater()` gave 50, then 60 after 10 more), so `end_offsets()`/
        `offsets_for_times()` are not used. A partition with no fetch response yet (highwater None)
        is left out; a paused partition keeps the highwater of its last fetch, so the gauge can
        only under-read then.
        """
        lag = 0
        for tp in self.partitions():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            pos = open_positions.get((tp.topic, tp.partition))
            if pos is None:
                pos = fetch_position(self.consumer, tp)
                if pos is None:
                    continue
            lag += max(0, high - pos)
        return lag


def fetch_position(consumer: Any, tp: TopicPartition) -> Optional[int]:
    """The consumer's position in `tp` as last resolved, read without side effects.

    Not `consumer.position(tp)`: in kafka-python 3.0.12 that call also drives committed-offset
    refresh, offset reset and leader-epoch validation for every assigned partition and can
    block on the coordinator (its `timeout_ms` also bounds tasks it leaves cached for `poll`);
    this runs after every poll. A kafka-python without this state gives None, and the
    partition is left out of the lag."""
    try:
        position = consumer._subscription.position(tp)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - unassigned meanwhile, or another kafka-python layout
        return None
    offset = getattr(position, "offset", position)
    return offset if isinstance(offset, int) else None
