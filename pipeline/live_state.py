"""Per-stream state of a live session: queue, ring buffer, objects, and what to run next.

Pure logic, no backend (as `pipeline.file_stream` is for files): `LiveSession` feeds it events
(`offer`, `take`, `on_decoded`, `on_encoded`, `on_result`, ...) and hands the commands that
`schedule()` returns (`pipeline.commands`) to the shared executor.

Frames move  queue (DROP_OLDEST) -> ring (taken: decoded, in flight, then published) -> evicted.
An object's life is split into *incarnations*: an incarnation covers the frames
`start <= j < end` with one tracker. A late `add` on an already stepped object ends the current
incarnation at k and starts a new one at k, so every frame has at most one incarnation per object
id, and a record never mixes two trackers of one object.

Revisions: a prompt that changes frames already published (an add or re-add at a buffered frame,
a refine of a published frame, a remove) makes those frames publish again, with `revision` one
higher, once every object's new result for them is in. Only frames still in the ring are revised.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

from masklet.actors.tracker import ObjectKey
from masklet.model.types import Prompt
from masklet.pipeline import commands as c
from masklet.pipeline.batching import BoundedQueue, OverflowPolicy
from masklet.pipeline.live_objects import Incarnation, ResultSlot, newest_due


@dataclass
class LiveFrame:
    frame_idx: int
    pts: float
    pixels: Any                     # reference to uint8 [H, W, 3], None until decoded
    image: Any                      # the EncodedImage to decode, or None
    token: Any
    submitted_at: float
    lost_before: int = 0            # frames the source says never arrived before this one
    dropped_before: int = 0         # queue drops (and refused out-of-order frames) reported by this record
    tokens: tuple = ()              # tokens this frame's output settles (drops/late frames, then its own)
    decoding: bool = False
    published: bool = False
    failure: Optional[str] = None   # undecodable: published as a failure, without a record
    encode_failed: bool = False     # no embedding: published without objects
    revision: int = 0               # of the next publication of this frame
    results: dict[int, tuple[int, Any]] = field(default_factory=dict)  # published: object -> (serial, result)
    removed: set[int] = field(default_factory=set)                     # objects to drop from the next revision


class LiveStream:
    def __init__(self, stream_id: str, width: int, height: int, fps: float | None, *, queue_capacity: int,
                 ring_frames: int, max_in_flight: int, snapshot_every: int, source_type: str,
                 revisions: bool = True, published_until: Optional[int] = None, revision_floor: int = 0) -> None:
        self.stream_id, self.width, self.height, self.fps = stream_id, width, height, fps
        self.source_type = source_type
        self.queue: BoundedQueue[LiveFrame] = BoundedQueue(queue_capacity, OverflowPolicy.DROP_OLDEST)
        self.ring: OrderedDict[int, LiveFrame] = OrderedDict()
        self.ring_frames, self.max_in_flight, self.snapshot_every = ring_frames, max_in_flight, snapshot_every
        self.revisions_enabled = revisions
        # After a restart, frames up to `published_until` were published by an earlier run, maybe as
        # revisions up to `revision_floor`: publishing them again starts above it, never below.
        self.published_until, self.revision_floor = published_until, revision_floor
        self.incs: list[Incarnation] = []
        self.results: dict[int, dict[int, ResultSlot]] = {}     # unpublished frame -> object -> slot
        self.revising: dict[int, dict[int, ResultSlot]] = {}    # published frame -> object -> slot
        self.embeddings: dict[int, Any] = {}
        self.requested: set[int] = set()
        self.carry_tokens: list = []     # settled by the next taken frame's output
        self.carry_drops = 0
        self.carry_lost = 0
        self.last_submitted: int | None = None
        self.frames_in = self.frames_published = self.frames_dropped = self.frames_lost = 0
        self.revisions_published = 0
        self.unacked = 0                 # publications sent, not yet acknowledged (set by the session)
        self.closing = False
        self.scores: dict[int, float] = {}
        self.publish_times: list[float] = []

    def key(self, inc: Incarnation) -> ObjectKey:
        return ObjectKey(self.stream_id, inc.object_id, inc.serial)

    # -- admission --------------------------------------------------------------------------

    def offer(self, frame: LiveFrame) -> LiveFrame | str | None:
        """Queue a submitted frame. Returns the frame dropped to make room, "out_of_order" when the
        frame itself is refused (not newer than the last one; reported in the next record like a
        drop), else None."""
        self.frames_in += 1
        self.carry_lost += frame.lost_before
        self.frames_lost += frame.lost_before
        if self.last_submitted is not None and frame.frame_idx <= self.last_submitted:
            self.frames_dropped += 1
            self.carry_drops += 1
            self.carry_tokens.append(frame.token)
            return "out_of_order"
        self.last_submitted = frame.frame_idx
        dropped = self.queue.put(frame)
        if dropped is not None:
            self.frames_dropped += 1
            self.carry_drops += 1
            self.carry_tokens.append(dropped.token)
        return dropped

    def in_flight(self) -> int:
        """Frames taken and not yet out: unpublished, or sent to the publisher and not acknowledged."""
        return sum(1 for f in self.ring.values() if not f.published) + self.unacked

    def take(self) -> list[Any]:
        """Move frames from the queue into the ring while the in-flight bound allows; compressed
        frames go to a decoder actor."""
        out: list[Any] = []
        while len(self.queue) and self.in_flight() < self.max_in_flight:
            frame = self.queue.get()
            frame.dropped_before, self.carry_drops = self.carry_drops, 0
            frame.lost_before, self.carry_lost = self.carry_lost, 0
            frame.tokens, self.carry_tokens = (*self.carry_tokens, frame.token), []
            if self.published_until is not None and frame.frame_idx <= self.published_until:
                frame.revision = self.revision_floor + 1
            self.ring[frame.frame_idx] = frame
            if frame.pixels is None and frame.image is not None:
                frame.decoding = True
                out.append(c.DecodeImage(self.stream_id, frame.frame_idx, frame.image))
        return out

    def on_decoded(self, frame_idx: int, pixels: Any) -> None:
        frame = self.ring.get(frame_idx)
        if frame is not None:
            frame.pixels, frame.image, frame.decoding = pixels, None, False

    def on_frame_failed(self, frame_idx: int, reason: str) -> None:
        """Undecodable (a failure output, no record) or not encodable (a record without objects)."""
        self.requested.discard(frame_idx)
        frame = self.ring.get(frame_idx)
        if frame is None:
            return
        if frame.decoding or reason.startswith("undecodable"):
            frame.decoding, frame.failure = False, reason
        else:
            frame.encode_failed = True

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

    def _unusable(self, frame: LiveFrame) -> bool:
        return frame.encode_failed or frame.failure is not None

    def _schedule_inc(self, inc: Incarnation) -> list[Any]:
        if self._retirable(inc):
            self.incs.remove(inc)
            return [c.CloseObject(self.key(inc))] if inc.opened else []
        out: list[Any] = []
        if inc.cursor is not None and inc.cursor in inc.refines:  # refine of the latest frame first
            emb = self.embeddings.get(inc.cursor)
            if emb is None:
                return self._request(inc.cursor)
            prompt = inc.refines.pop(inc.cursor)
            inc.applied.append((inc.cursor, "refine", prompt))
            seq = self._expect(inc, inc.cursor)
            out.append(c.Refine(self.key(inc), inc.cursor, emb, prompt, tag=("result", inc.generation, seq)))
        for j, frame in self.ring.items():
            if not inc.covers(j) or (inc.cursor is not None and j <= inc.cursor):
                continue
            if self._unusable(frame):
                continue  # no embedding: the object is absent from this record, the prompt moves on
            emb = self.embeddings.get(j)
            if emb is None:
                for k, later in self.ring.items():  # ask for this and every later frame at once, so they batch
                    if k >= j and inc.covers(k) and not self._unusable(later):
                        out += self._request(k)
                break
            prompt = newest_due(inc.adds, j)
            if inc.cursor is None and prompt is None:
                break  # never happens: `start` is the first held add's frame
            if not inc.opened:
                inc.opened = True
                out.append(c.OpenObject(self.key(inc), (self.height, self.width)))
            refine = newest_due(inc.refines, j)
            for kind, p in (("add", prompt), ("refine", refine)):
                if p is not None:
                    inc.applied.append((j, kind, p))
            seq = self._expect(inc, j)
            if refine is None:
                out.append(c.Step(self.key(inc), j, emb, prompt, tag=("result", inc.generation, seq)))
            else:  # the refine's result is the frame's; the step only feeds it
                out.append(c.Step(self.key(inc), j, emb, prompt, tag=("aux", inc.generation, seq)))
                out.append(c.Refine(self.key(inc), j, emb, refine, tag=("result", inc.generation, seq)))
            inc.cursor = j
            inc.steps_since_snapshot += 1
            if inc.steps_since_snapshot >= self.snapshot_every:
                inc.steps_since_snapshot = 0
                out.append(c.Snapshot(self.key(inc), tag=("snapshot", inc.generation, j)))
        return out

    def _request(self, frame_idx: int) -> list[Any]:
        frame = self.ring.get(frame_idx)
        if frame_idx in self.embeddings or frame_idx in self.requested or frame is None or frame.pixels is None:
            return []  # already there or asked for, or still decoding (asked for again next round)
        self.requested.add(frame_idx)
        return [c.Encode(self.stream_id, frame_idx, frame.pixels)]

    def _expect(self, inc: Incarnation, frame_idx: int) -> int:
        """Register a result to come for (frame, object); returns its sequence number."""
        frame = self.ring.get(frame_idx)
        inc.seq += 1
        if frame is None:
            return inc.seq
        if frame.published:
            replayed = inc.replay_until is not None and frame_idx <= inc.replay_until \
                and frame_idx not in inc.revise_on_replay
            if not self.revisions_enabled or replayed:
                return inc.seq  # only the tracker's memory needs this step; the published result stands
            table = self.revising.setdefault(frame_idx, {})
        else:
            table = self.results.setdefault(frame_idx, {})
        slot = table.get(inc.object_id)
        if slot is None or slot.serial != inc.serial or inc.generation not in slot.generations:
            slot = table[inc.object_id] = ResultSlot(inc.serial, {inc.generation})
        slot.outstanding += 1
        return inc.seq

    def _retirable(self, inc: Incarnation) -> bool:
        if inc.end is None:
            return False
        if inc.end <= inc.start:
            return True
        if any(inc.covers(j) and (not f.published or j in self.revising) for j, f in self.ring.items()):
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
            if not frame.published or self._needed(j) or j in self.requested or j in self.revising:
                break  # a catch-up still steps through it, or its revision is on its way
            del self.ring[j]

    # -- results ----------------------------------------------------------------------------

    def on_encoded(self, frame_idx: int, embedding: Any) -> None:
        self.requested.discard(frame_idx)
        if frame_idx in self.ring and self._needed(frame_idx):
            self.embeddings[frame_idx] = embedding

    def on_result(self, key: ObjectKey, generation: int, frame_idx: int, seq: int, future: Any, score: float) -> None:
        frame = self.ring.get(frame_idx)
        table = self.revising if frame is not None and frame.published else self.results
        slot = table.get(frame_idx, {}).get(key.object_id)
        if slot is None or slot.serial != key.serial or generation not in slot.generations:
            return  # a result of a replaced tracker
        slot.outstanding -= 1
        if seq > slot.seq:
            slot.seq, slot.value, slot.score = seq, future, score

    def on_snapshot(self, key: ObjectKey, generation: int, frame_idx: int, snapshot: Any) -> None:
        inc = self.find(key)
        if inc is not None and inc.generation == generation and (inc.snapshot_frame or -1) < frame_idx:
            inc.snapshot, inc.snapshot_frame = snapshot, frame_idx

    def on_tracker_lost(self, key: ObjectKey) -> Incarnation | None:
        """Roll the incarnation back to its last snapshot; its held prompts since then are re-held, so
        `schedule` replays the buffered frames after it. Returns it (the caller reopens it from
        `inc.snapshot`), or None when it cannot be replayed (frames evicted) and was ended at the
        oldest unpublished frame."""
        inc = self.find(key)
        if inc is None:
            return None
        inc.generation += 1
        inc.opened = False
        back_to = inc.snapshot_frame if inc.snapshot is not None else None
        first_needed = inc.start if back_to is None else back_to + 1
        oldest = self.oldest_buffered
        if inc.cursor is not None and first_needed <= inc.cursor and oldest is not None and first_needed < oldest:
            # Frames to replay left the ring (or were dropped: we cannot tell, so be conservative).
            self.end_at(inc, self.first_unpublished())
            return None
        for j, kind, prompt in [a for a in inc.applied if back_to is None or a[0] > back_to]:
            (inc.adds if kind == "add" else inc.refines)[j] = prompt
        inc.applied = [a for a in inc.applied if back_to is not None and a[0] <= back_to]
        inc.replay_until = inc.cursor if inc.replay_until is None else max(inc.replay_until, inc.cursor or -1)
        inc.cursor, inc.steps_since_snapshot = back_to, 0
        inc.revise_on_replay |= {j for j, slots in self.revising.items() if inc.object_id in slots
                                 and (back_to is None or j > back_to)}
        for table in (self.results, self.revising):
            for j, slots in table.items():  # results up to the snapshot stay valid
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
        if self.revisions_enabled:  # published frames it no longer covers lose it in their next revision
            for j, frame in self.ring.items():
                if j >= inc.end and frame.published and frame.results.get(inc.object_id, (None,))[0] == inc.serial:
                    frame.removed.add(inc.object_id)

    def first_unpublished(self) -> int | None:
        return next((j for j, f in self.ring.items() if not f.published), None)

    def find(self, key: ObjectKey) -> Incarnation | None:
        return next((i for i in self.incs if i.object_id == key.object_id and i.serial == key.serial), None)

    # -- emission ---------------------------------------------------------------------------

    def expected(self, frame_idx: int) -> list[Incarnation]:
        return sorted((i for i in self.incs if i.covers(frame_idx)), key=lambda i: i.object_id)

    def ready_to_publish(self) -> list[tuple[LiveFrame, list[Any]]]:
        """Frames, oldest first, whose every expected object has its result: (frame, result futures).
        A failed frame comes with no futures (its output carries the failure)."""
        out = []
        for j, frame in self.ring.items():
            if frame.published:
                continue
            if frame.decoding or (frame.pixels is None and frame.failure is None):
                return out
            picked = self._complete(j, self.results, [] if self._unusable(frame) else self.expected(j))
            if picked is None:
                return out
            frame.published = True
            self.results.pop(j, None)
            frame.results = picked
            out.append((frame, [value for _, value in picked.values()]))
        return out

    def ready_to_revise(self) -> list[tuple[LiveFrame, list[Any]]]:
        """Published frames whose new results are all in (and that no object still has to step)."""
        out = []
        for j, frame in self.ring.items():
            if not frame.published or (j not in self.revising and not frame.removed):
                continue
            if any(i.covers(j) and (i.cursor is None or j > i.cursor) and not self._unusable(frame) for i in self.incs):
                continue  # a catch-up has not reached this frame yet
            revised = self._complete(j, self.revising, [i for i in self.expected(j) if i.object_id in
                                                         self.revising.get(j, {})])
            if revised is None:
                continue
            self.revising.pop(j, None)
            merged = {o: v for o, v in frame.results.items() if o not in frame.removed}
            merged.update(revised)
            frame.removed.clear()
            frame.results = merged
            frame.revision += 1
            out.append((frame, [value for _, value in merged.values()]))
        return out

    def _complete(self, frame_idx: int, table: dict, incs: list[Incarnation]) -> dict[int, tuple[int, Any]] | None:
        picked: dict[int, tuple[int, Any]] = {}
        for inc in incs:
            slot = table.get(frame_idx, {}).get(inc.object_id)
            if slot is None or slot.serial != inc.serial or inc.generation not in slot.generations \
                    or slot.outstanding > 0 or slot.value is None:
                return None
            picked[inc.object_id] = (inc.serial, slot.value)
            self.scores[inc.object_id] = slot.score
        return picked

    @property
    def drained(self) -> bool:
        return not len(self.queue) and all(f.published for f in self.ring.values()) and not self.revising
