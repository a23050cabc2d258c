"""Per-stream frame order by `frame_idx` in `masklet run`: reordering healed, losses named.

Kafka keeps a partition in order, but not across a restart of a memory-only broker: records
resent by a producer can land behind newer ones (measured on Tansu: 52 frames), and records the
broker had acknowledged can be gone. The runner used to pass frames on in arrival order, so the
session refused the late ones as out of order and nobody learnt about the lost ones.

`FrameReorder` sits between the input gate and the session. A stream whose indices have been
regular (the same step for the last `REGULAR_AFTER` frames, 1 for `masklet ingest`) has an expected
next index. A frame beyond it opens a *gap*: later frames are held, in index order, until the
missing ones arrive (then everything goes on in order) or the gap has been open `window_s` seconds
or `window_frames` frames are held. Then the missing indices are declared lost: they are named in
the outcome and counted, and the next frame carries `lost_before` (the session reports it in the
record's `lost_frames_since_last`). Streams with irregular indices are never held (a gap there
may be the producer's own sampling).

Arrivals at or below the newest released index:
  * `duplicate`: released before (a producer resend): settled, not a new frame;
  * `late`: declared lost before (a resend slower than the window): settled, counted, still lost;
  * `out_of_order`: neither (older than the stream's first frame here): passed to the session,
    which refuses and counts it.
A jump past `max_gap` (the gate only lets one through once several frames agree on it: the
producer renumbered) is followed without reporting losses.
"""
from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REGULAR_AFTER = 4          # equal steps in a row before gaps are waited for
RECENT_RELEASED = 4096     # released indices remembered per stream, to tell duplicates from late frames
RECENT_LOST = 100_000      # lost indices remembered per stream


@dataclass(frozen=True)
class Release:
    frame: Any                      # the gate's AcceptedFrame (anything with stream_id and frame_idx)
    lost_before: int = 0            # frames declared lost just before this one
    lost: tuple[int, ...] = ()      # their indices (empty beyond 10,000: see `lost_ranges`)
    lost_ranges: tuple[tuple[int, int], ...] = ()  # (first, last) inclusive, on the stream's step


@dataclass(frozen=True)
class Refused:
    frame: Any
    kind: str                       # duplicate | late | out_of_order


@dataclass
class _Stream:
    newest: Optional[int] = None                  # highest released index
    steps: deque = field(default_factory=lambda: deque(maxlen=REGULAR_AFTER))
    held: list = field(default_factory=list)      # heap of (frame_idx, seq, frame)
    gap_since: Optional[float] = None             # when the oldest open gap was noticed
    released: set = field(default_factory=set)
    released_order: deque = field(default_factory=deque)
    lost: set = field(default_factory=set)
    lost_order: deque = field(default_factory=deque)

    @property
    def step(self) -> Optional[int]:
        if len(self.steps) == REGULAR_AFTER and len(set(self.steps)) == 1:
            return self.steps[0]
        return None


class FrameReorder:
    def __init__(self, window_s: float = 3.0, window_frames: int = 128, max_gap: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.window_frames, self.max_gap = window_s, window_frames, max_gap
        self.clock = clock
        self._streams: dict[str, _Stream] = {}
        self._seq = 0

    def held(self) -> int:
        return sum(len(s.held) for s in self._streams.values())

    def next_deadline(self) -> Optional[float]:
        due = [s.gap_since + self.window_s for s in self._streams.values() if s.gap_since is not None]
        return min(due) if due else None

    def offer(self, frame: Any) -> list[Release | Refused]:
        """The frames that may go on now (in index order), or what to do with a refused one."""
        s = self._streams.setdefault(frame.stream_id, _Stream())
        idx = frame.frame_idx
        if s.newest is not None and idx <= s.newest:
            return [self._refuse(s, frame)]
        if any(idx == held_idx for held_idx, _, _ in s.held):
            return [Refused(frame, "duplicate")]
        self._seq += 1
        heapq.heappush(s.held, (idx, self._seq, frame))
        return self._drain(s, self.clock())

    def expire(self) -> list[Release]:
        """Gaps whose window ran out: their missing frames are declared lost."""
        now = self.clock()
        out: list[Release] = []
        for s in self._streams.values():
            out += self._drain(s, now)
        return out

    def unhold(self, stream_ids: set[str]) -> list[Any]:
        """Partitions revoked: the streams' held frames are dropped (they are read again from the last
        commit, here or by another member) but their history stays, for when they come back here
        (a rebalance after a broker restart usually gives the same partitions back)."""
        dropped = []
        for stream_id in stream_ids:
            s = self._streams.get(stream_id)
            if s is not None:
                dropped += [frame for _, _, frame in s.held]
                s.held, s.gap_since = [], None
        return dropped

    def forget(self, stream_ids: set[str]) -> None:
        """Streams now owned by another member: their history goes too."""
        for stream_id in stream_ids:
            self._streams.pop(stream_id, None)

    # -- internals --------------------------------------------------------------------------

    def _refuse(self, s: _Stream, frame: Any) -> Refused:
        if frame.frame_idx in s.released:
            return Refused(frame, "duplicate")
        if frame.frame_idx in s.lost:
            return Refused(frame, "late")
        return Refused(frame, "out_of_order")

    def _drain(self, s: _Stream, now: float) -> list[Release]:
        out: list[Release] = []
        while s.held:
            idx = s.held[0][0]
            expected = None if s.newest is None or s.step is None else s.newest + s.step
            if expected is None or idx <= expected or idx - s.newest > self.max_gap:
                out.append(self._release(s, Release(heapq.heappop(s.held)[2])))
                continue
            if s.gap_since is None:
                s.gap_since = now
            if now - s.gap_since < self.window_s and len(s.held) < self.window_frames:
                break  # wait for the missing frames
            out.append(self._release(s, self._declare_lost(s, heapq.heappop(s.held)[2], s.step)))
        if not s.held:
            s.gap_since = None
        return out

    def _declare_lost(self, s: _Stream, frame: Any, step: int) -> Release:
        first, last = s.newest + step, frame.frame_idx - step
        count = (last - first) // step + 1
        missing = tuple(range(first, last + 1, step)) if count <= 10_000 else ()
        for idx in missing:
            s.lost.add(idx)
            s.lost_order.append(idx)
        while len(s.lost_order) > RECENT_LOST:
            s.lost.discard(s.lost_order.popleft())
        s.gap_since = None  # a later gap gets its own window
        return Release(frame, count, missing, ((first, last),))

    def _release(self, s: _Stream, release: Release) -> Release:
        idx = release.frame.frame_idx
        if s.newest is not None and not release.lost_before and idx - s.newest <= self.max_gap:
            s.steps.append(idx - s.newest)
        elif s.newest is not None and idx - s.newest > self.max_gap:
            s.steps.clear()  # renumbered: learn the step again
        s.newest = idx
        s.released.add(idx)
        s.released_order.append(idx)
        while len(s.released_order) > RECENT_RELEASED:
            s.released.discard(s.released_order.popleft())
        return release
