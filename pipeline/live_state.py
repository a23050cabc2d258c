"""Per-stream state of a live session: queue, ring buffer, objects, and what to run next.

Pure logic, no backend (as `pipeline.controller` is for files): `LiveSession` feeds it events
(`offer`, `take`, `on_encoded`, `on_result`, ...) and executes the small frozen commands that
`schedule()` returns, in order.

Frames move  queue (DROP_OLDEST) -> ring (taken: in flight, then published) -> evicted.
An object's life is split into *incarnations*: an incarnation covers the frames
`start <= j < end` with one tracker actor. A late `add` on an already stepped object ends the
current incarnation at k and starts a new one at k, so every frame has at most one incarnation
per object id, and published records never mix two trackers of one object.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from masklet.model.types import Prompt
from masklet.pipeline.batching import BoundedQueue, OverflowPolicy


# -- commands (executed by LiveSession) ------------------------------------------------------


@dataclass(frozen=True)
class Encode:
    frame_idx: int


@dataclass(frozen=True)
class Step:
    key: tuple[int, int]            # (object_id, incarnation serial)
    frame_idx: int
    embedding: Any
    prompt: Prompt | None = None
    refine: Prompt | None = None    # run the model's refine right after the step (held refine)


@dataclass(frozen=True)
class Refine:
    key: tuple[int, int]
    frame_idx: int                  # the tracker's latest frame
    embedding: Any
    prompt: Prompt


@dataclass(frozen=True)
class TakeSnapshot:
    key: tuple[int, int]
    frame_idx: int


@dataclass(frozen=True)
class Retire:
    key: tuple[int, int]


# -- state -----------------------------------------------------------------------------------


@dataclass
class LiveFrame:
    frame_idx: int
    pts: float
    rgb: np.ndarray = field(repr=False)
    token: Any
    submitted_at: float
    rgb_ref: Any = None             # backend.put(rgb), set when taken
    dropped_before: int = 0         # queue drops reported by this frame's record
    tokens: tuple = ()              # tokens this frame's output settles (drops/late frames, then its own)
    published: bool = False
    encode_failed: bool = False


@dataclass
class Incarnation:
    object_id: int
    serial: int
    start: int
    end: int | None = None                       # exclusive; None: open
    cursor: int | None = None                    # last frame dispatched to the tracker
    adds: dict[int, Prompt] = field(default_factory=dict)     # held prompts by frame
    refines: dict[int, Prompt] = field(default_factory=dict)  # held refines by frame
    applied: list[tuple[int, str, Prompt]] = field(default_factory=list)  # for replay after a tracker loss
    generation: int = 0                          # grows when the tracker is rebuilt
    steps_since_snapshot: int = 0
    snapshot: Any = None
    snapshot_frame: int | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.object_id, self.serial)

    def covers(self, frame_idx: int) -> bool:
        return self.start <= frame_idx and (self.end is None or frame_idx < self.end)


@dataclass
class ResultSlot:
    serial: int
    generations: set[int]           # tracker generations whose results count (see on_tracker_lost)
    seq: int = -1
    value: Any = None               # future of the newest completed TrackedMask
    outstanding: int = 0


class LiveStream:
    def __init__(self, stream_id: str, width: int, height: int, fps: float | None, *, queue_capacity: int,
                 ring_frames: int, max_in_flight: int, snapshot_every: int, source_type: str) -> None:
        self.stream_id, self.width, self.height, self.fps = stream_id, width, height, fps
        self.source_type = source_type
        self.queue: BoundedQueue[LiveFrame] = BoundedQueue(queue_capacity, OverflowPolicy.DROP_OLDEST)
        self.ring: OrderedDict[int, LiveFrame] = OrderedDict()
        self.ring_frames, self.max_in_flight, self.snapshot_every = ring_frames, max_in_flight, snapshot_every
        self.incs: list[Incarnation] = []
        self.results: dict[int, dict[int, ResultSlot]] = {}
        self.embeddings: dict[int, Any] = {}
        self.requested: set[int] = set()
        self.carry_tokens: list = []     # settled by the next taken frame's output
        self.carry_drops = 0
        self.last_submitted: int | None = None
        self.frames_in = self.frames_published = self.frames_dropped = 0
        self.closing = False
        self.scores: dict[int, float] = {}
        self.publish_times: list[float] = []

    # -- admission --------------------------------------------------------------------------

    def offer(self, frame: LiveFrame) -> LiveFrame | str | None:
        """Queue a submitted frame. Returns the frame dropped to make room, "out_of_order" when the
        frame itself is refused (not newer than the last one), else None."""
        self.frames_in += 1
        if self.last_submitted is not None and frame.frame_idx <= self.last_submitted:
            self.frames_dropped += 1
            self.carry_tokens.append(frame.token)  # not a lost frame: no count in the record
            return "out_of_order"
        self.last_submitted = frame.frame_idx
        dropped = self.queue.put(frame)
        if dropped is not None:
            self.frames_dropped += 1
            self.carry_drops += 1
            self.carry_tokens.append(dropped.token)
        return dropped

    def in_flight(self) -> int:
        return sum(1 for f in self.ring.values() if not f.published)

    def take(self) -> list[LiveFrame]:
        """Move frames from the queue into the ring while the in-flight bound allows."""
        taken = []
        while len(self.queue) and self.in_flight() < self.max_in_flight:
            frame = self.queue.get()
            frame.dropped_before, self.carry_drops = self.carry_drops, 0
            frame.tokens, self.carry_tokens = (*self.carry_tokens, frame.token), []
            self.ring[frame.frame_idx] = frame
            taken.append(frame)
        return taken

    @property
    def newest_taken(self) -> int | None:
        return next(reversed(self.ring)) if self.ring else None

    @property
    def oldest_buffered(self) -> int | None:
        return next(iter(self.ring)) if self.ring else None

    def active(self, object_id: int) -> Incarnation | None:
        return next((i for i in self.incs if i.object_id == object_id and i.end is None), None)

    # -- scheduling -------------------------------------------------------------------------

    def schedule(self) -> list[Any]:
        self._evict()  # first: commands below may name any frame still in the ring
        out: list[Any] = []
        for inc in list(self.incs):
            out += self._schedule_inc(inc)
        self._release_embeddings()
        return out

    def _schedule_inc(self, inc: Incarnation) -> list[Any]:
        if self._retirable(inc):
            self.incs.remove(inc)
            return [Retire(inc.key)]
        out: list[Any] = []
        if inc.cursor is not None and inc.cursor in inc.refines:  # refine of the latest frame first
            emb = self.embeddings.get(inc.cursor)
            if emb is None:
                return self._request(inc.cursor)
            prompt = inc.refines.pop(inc.cursor)
            inc.applied.append((inc.cursor, "refine", prompt))
            self._expect(inc, inc.cursor)
            out.append(Refine(inc.key, inc.cursor, emb, prompt))
        for j, frame in self.ring.items():
            if not inc.covers(j) or (inc.cursor is not None and j <= inc.cursor):
                continue
            if frame.encode_failed:
                continue  # no embedding: the object is absent from this record, the prompt moves on
            emb = self.embeddings.get(j)
            if emb is None:
                for k in self.ring:  # ask for this and every later frame at once, so they batch
                    if k >= j and inc.covers(k) and not self.ring[k].encode_failed:
                        out += self._request(k)
                break
            prompt = _newest_due(inc.adds, j)
            if inc.cursor is None and prompt is None:
                break  # never happens: `start` is the first held add's frame
            refine = _newest_due(inc.refines, j)
            for kind, p in (("add", prompt), ("refine", refine)):
                if p is not None:
                    inc.applied.append((j, kind, p))
            self._expect(inc, j)
            out.append(Step(inc.key, j, emb, prompt, refine))
            inc.cursor = j
            inc.steps_since_snapshot += 1
            if inc.steps_since_snapshot >= self.snapshot_every:
                inc.steps_since_snapshot = 0
                out.append(TakeSnapshot(inc.key, j))
        return out

    def _request(self, frame_idx: int) -> list[Any]:
        if frame_idx in self.embeddings or frame_idx in self.requested:
            return []
        self.requested.add(frame_idx)
        return [Encode(frame_idx)]

    def _expect(self, inc: Incarnation, frame_idx: int) -> None:
        frame = self.ring.get(frame_idx)
        if frame is None or frame.published:
            return  # catch-up of a published frame: only the tracker's memory needs it
        slots = self.results.setdefault(frame_idx, {})
        slot = slots.get(inc.object_id)
        if slot is None or slot.serial != inc.serial or inc.generation not in slot.generations:
            slot = slots[inc.object_id] = ResultSlot(inc.serial, {inc.generation})
        slot.outstanding += 1

    def _retirable(self, inc: Incarnation) -> bool:
        if inc.end is None:
            return False
        if inc.end <= inc.start:
            return True
        if any(not f.published and inc.covers(j) for j, f in self.ring.items()):
            return False
        # Frames below `end` may still arrive unless the stream has moved past them.
        return self.closing or (self.last_submitted is not None and self.last_submitted >= inc.end - 1)

    def _needed(self, frame_idx: int) -> bool:
        for inc in self.incs:
            if inc.covers(frame_idx) and (inc.cursor is None or frame_idx > inc.cursor):
                return True
            if inc.cursor == frame_idx and frame_idx in inc.refines:
                return True
        return False

    def _release_embeddings(self) -> None:
        for j in [j for j in self.embeddings if not self._needed(j)]:
            del self.embeddings[j]

    def _evict(self) -> None:
        while len(self.ring) > self.ring_frames:
            j, frame = next(iter(self.ring.items()))
            if not frame.published or self._needed(j) or j in self.requested:
                break  # a catch-up still steps through it
            del self.ring[j]

    # -- updates ----------------------------------------------------------------------------

    def on_encoded(self, frame_idx: int, embedding: Any) -> None:
        self.requested.discard(frame_idx)
        if frame_idx in self.ring and self._needed(frame_idx):
            self.embeddings[frame_idx] = embedding

    def on_encode_failed(self, frame_idx: int) -> None:
        self.requested.discard(frame_idx)
        if frame_idx in self.ring:
            self.ring[frame_idx].encode_failed = True

    def on_result(self, key: tuple[int, int], generation: int, frame_idx: int, seq: int, future: Any) -> None:
        slot = self.results.get(frame_idx, {}).get(key[0])
        if slot is None or slot.serial != key[1] or generation not in slot.generations:
            return  # a result of a replaced tracker
        slot.outstanding -= 1
        if seq > slot.seq:
            slot.seq, slot.value = seq, future

    def on_snapshot(self, key: tuple[int, int], generation: int, frame_idx: int, snapshot: Any) -> None:
        inc = self._find(key)
        if inc is not None and inc.generation == generation and (inc.snapshot_frame or -1) < frame_idx:
            inc.snapshot, inc.snapshot_frame = snapshot, frame_idx

    def on_tracker_lost(self, key: tuple[int, int], generation: int) -> Incarnation | None:
        """Roll the incarnation back to its last snapshot; its held prompts since then are re-held, so
        `schedule` replays the buffered frames after it. Returns it, or None when it cannot be
        replayed (frames evicted) and was ended at the oldest unpublished frame."""
        inc = self._find(key)
        if inc is None or inc.generation != generation:
            return None
        inc.generation += 1
        back_to = inc.snapshot_frame if inc.snapshot is not None else None
        first_needed = inc.start if back_to is None else back_to + 1
        oldest = self.oldest_buffered
        if inc.cursor is not None and first_needed <= inc.cursor and oldest is not None and first_needed < oldest:
            # Frames to replay left the ring (or were dropped: we cannot tell, so be conservative).
            self.end_at(inc, self._first_unpublished())
            return None
        for j, kind, prompt in [a for a in inc.applied if back_to is None or a[0] > back_to]:
            (inc.adds if kind == "add" else inc.refines)[j] = prompt
        inc.applied = [a for a in inc.applied if back_to is not None and a[0] <= back_to]
        inc.cursor, inc.steps_since_snapshot = back_to, 0
        for j, slots in self.results.items():  # results up to the snapshot stay valid
            slot = slots.get(inc.object_id)
            if slot is not None and slot.serial == inc.serial:
                if back_to is not None and j <= back_to:
                    # The snapshot proves these steps ran; their results (maybe not seen yet) count.
                    slot.generations.add(inc.generation)
                else:
                    del slots[inc.object_id]
        return inc

    def end_at(self, inc: Incarnation, frame_idx: int | None) -> None:
        end = frame_idx if frame_idx is not None else (self.last_submitted or 0) + 1
        inc.end = max(inc.start, end)  # end == start: the incarnation covers nothing and retires
        inc.adds = {f: p for f, p in inc.adds.items() if f < inc.end}
        inc.refines = {f: p for f, p in inc.refines.items() if f < inc.end}

    def _first_unpublished(self) -> int | None:
        return next((j for j, f in self.ring.items() if not f.published), None)

    def _find(self, key: tuple[int, int]) -> Incarnation | None:
        return next((i for i in self.incs if i.key == key), None)

    # -- emission ---------------------------------------------------------------------------

    def expected(self, frame_idx: int) -> list[Incarnation]:
        return sorted((i for i in self.incs if i.covers(frame_idx)), key=lambda i: i.object_id)

    def ready_to_publish(self) -> list[tuple[LiveFrame, list[Any]]]:
        """Frames, oldest first, whose every expected object has its result: (frame, result futures)."""
        out = []
        for j, frame in self.ring.items():
            if frame.published:
                continue
            futures = []
            for inc in ([] if frame.encode_failed else self.expected(j)):
                slot = self.results.get(j, {}).get(inc.object_id)
                if slot is None or slot.serial != inc.serial or inc.generation not in slot.generations \
                        or slot.outstanding > 0 or slot.value is None:
                    return out
                futures.append(slot.value)
            frame.published = True
            self.results.pop(j, None)
            out.append((frame, futures))
        return out

    @property
    def drained(self) -> bool:
        return not len(self.queue) and all(f.published for f in self.ring.values())


def _newest_due(held: dict[int, Prompt], frame_idx: int) -> Prompt | None:
    """Pop every held prompt for frames <= frame_idx and return the newest (a dropped or failed frame
    passes its prompt on to the next processed one)."""
    due = sorted(f for f in held if f <= frame_idx)
    if not due:
        return None
    prompt = held[due[-1]]
    for f in due:
        del held[f]
    return prompt
