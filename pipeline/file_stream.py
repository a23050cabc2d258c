"""Per-stream state machine: which frames are in flight, what each object's trackers must do next,
which embeddings must be kept for replay, and which frame may be published.

Pure logic, no backend: the offline engine feeds it events (`admit`, `on_encoded`, `on_step_done`,
...) and hands the commands `schedule()` returns (`pipeline.commands`, the vocabulary the live
scheduler uses too) to the shared executor, in order.

Backward propagation (files): an object first prompted at frame k is stepped forward from k. Once
the forward tracker has stepped k + `backward_delay` (or the input ended), a backward tracker is
branched off (`BranchBackward`) and steps k-1 down to 0. The delay matters: the official predictor
runs `reverse=True` after the forward pass, so its backward memory holds the forward results of
the frames just after k; the model's reverse tracker is seeded from exactly those frames. Frames
before k wait, with their embeddings, for the backward pass; they, and finished frames waiting
only for their turn to be published, do not count against the in-flight bound, so forward
progress is never blocked by them.

Recovery: every `snapshot_every` steps an object's actor snapshots its trackers. Embeddings are
kept from the last completed snapshot on, so a replacement actor resumes from that snapshot and
replays exactly the steps after it (`on_tracker_lost`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from masklet.actors.payloads import FrameMeta
from masklet.actors.tracker import BACKWARD, FORWARD, ObjectKey
from masklet.model.types import Prompt
from masklet.pipeline import commands as c
from masklet.pipeline.batching import OverflowPolicy


class StreamError(RuntimeError):
    """The stream cannot go on (bad prompt, input shorter than a prompt frame); one-line message."""


@dataclass(frozen=True)
class SnapshotTag:
    """What a snapshot covers, returned with its completion."""

    object_id: int
    forward_frame: int | None
    backward_frame: int | None


# -- state ------------------------------------------------------------------------------------


@dataclass
class FrameSlot:
    frame_idx: int
    pts: float
    rgb: Any
    needs_encoding: bool
    dropped_before: int = 0
    results: dict[int, Any] = field(default_factory=dict)


@dataclass
class ObjectState:
    object_id: int
    prompts: dict[int, Prompt]
    created: bool = False
    anchor: int | None = None           # frame of the first forward step (the first prompt)
    forward_cursor: int | None = None    # last frame dispatched forward
    backward_cursor: int | None = None   # last frame dispatched backward
    backward_started: bool = False
    backward_branch: int | None = None   # forward frame after which the backward tracker was branched
    applied: dict[int, Prompt] = field(default_factory=dict)  # prompts as dispatched, for replay
    steps_since_snapshot: int = 0
    snapshot: Any = None
    safe_forward: int | None = None      # forward frame covered by the last completed snapshot
    safe_backward: int | None = None     # backward frame covered by it (None: not in it)

    @property
    def first_frame(self) -> int:
        return min(self.prompts)


def frames_within(budget: int, capacity: int, read_chunk: int) -> int:
    """The most frames in flight that keep a stream's decoded pixels within `budget` frames.

    A decoder read's frames are one object (actors.decoder), freed when its last frame is done;
    reads are in order, so every live read but the oldest is wholly in flight, and the pixels held
    are at most capacity + chunk - 1 frames, where chunk = min(read_chunk, capacity). Never fewer
    than two frames in flight, so reading overlaps encoding."""
    if budget - read_chunk + 1 >= read_chunk:                 # room for whole reads of read_chunk
        return max(2, min(capacity, budget - read_chunk + 1))
    return max(2, min(capacity, (budget + 1) // 2))            # reads shrink to the capacity itself


class FileStream:
    def __init__(self, stream_id: str, objects: Mapping[int, Mapping[int, Prompt]], *, bidirectional: bool = True,
                 publish_pixels: bool = True,
                 policy: OverflowPolicy = OverflowPolicy.WAIT, queue_capacity: int = 16,
                 queue_bytes: int | None = None, read_chunk: int = 1, replay_frames: int = 64,
                 snapshot_every: int = 30, backward_delay: int = 0) -> None:
        if snapshot_every > replay_frames:
            raise ValueError(f"snapshot_every ({snapshot_every}) must not exceed replay_frames ({replay_frames})")
        self.stream_id = stream_id
        self.objects = {int(o): ObjectState(int(o), dict(p)) for o, p in objects.items() if p}
        self.bidirectional = bidirectional
        # Whether the publisher's sinks draw the frame (a preview): otherwise its pixels are not sent
        # there (one object-store fetch and reference less per frame).
        self.publish_pixels = publish_pixels
        self.policy = OverflowPolicy(policy)
        self.queue_capacity = queue_capacity
        self.queue_bytes = queue_bytes  # caps queue_capacity once the frame size is known
        self.read_chunk = read_chunk    # frames per decoder read (their pixels are freed together)
        self.replay_frames = replay_frames
        self.snapshot_every = snapshot_every
        self.backward_delay = backward_delay
        self.video_size: tuple[int, int] | None = None
        self.slots: dict[int, FrameSlot] = {}        # admitted, not yet published (ascending)
        self.embeddings: dict[int, Any] = {}         # kept for pending steps and replay (ascending)
        self.awaiting_encode: list[int] = []
        self.input_ended = False
        self.last_admitted: int | None = None
        self.frames_admitted = 0
        self.frames_published = 0
        self.frames_dropped = 0
        self._pending_drops = 0

    # -- admission --------------------------------------------------------------------------

    def set_video_size(self, width: int, height: int) -> None:
        self.video_size = (height, width)
        if self.queue_bytes is not None:
            self.queue_capacity = frames_within(self.queue_bytes // max(1, 3 * width * height),  # RGB24
                                                self.queue_capacity, self.read_chunk)
        for obj in self.objects.values():
            for frame_idx, prompt in obj.prompts.items():
                try:
                    prompt.check_inside(self.video_size)
                except ValueError as exc:
                    raise StreamError(f"object {obj.object_id} on frame {frame_idx}: {exc}") from None

    def room(self) -> int:
        """How many more frames may be admitted now; under DROP_OLDEST admission never waits."""
        if self.input_ended:
            return 0
        if self.policy is OverflowPolicy.DROP_OLDEST:
            return self.queue_capacity
        in_flight = sum(1 for j, slot in self.slots.items() if not self._parked(j) and not self._complete(slot))
        unsnapshotted = max((self._unsnapshotted(o) for o in self.objects.values() if o.created), default=0)
        return min(self.queue_capacity - len(self.awaiting_encode), self.queue_capacity - in_flight,
                   self.replay_frames - unsnapshotted)

    def admit(self, frame_idx: int, pts: float, rgb: Any) -> tuple[bool, int | None]:
        """Take a decoded frame. Returns (send it to the encoder?, frame dropped to make room or None)."""
        if self.last_admitted is not None and frame_idx <= self.last_admitted:
            raise StreamError(f"frame {frame_idx} arrived after frame {self.last_admitted}")
        dropped = None
        if self.policy is OverflowPolicy.DROP_OLDEST and len(self.awaiting_encode) >= self.queue_capacity:
            dropped = self.awaiting_encode.pop(0)
            del self.slots[dropped]
            self.frames_dropped += 1
            self._pending_drops += 1
        needs = self._needs_encoding(frame_idx)
        self.slots[frame_idx] = FrameSlot(frame_idx, pts, rgb, needs, self._pending_drops)
        self._pending_drops = 0
        self.last_admitted = frame_idx
        self.frames_admitted += 1
        if needs:
            self.awaiting_encode.append(frame_idx)
        return needs, dropped

    def end_input(self) -> None:
        self.input_ended = True
        for obj in self.objects.values():
            if self.last_admitted is None or obj.first_frame > self.last_admitted:
                total = 0 if self.last_admitted is None else self.last_admitted + 1
                raise StreamError(f"object {obj.object_id} is prompted on frame {obj.first_frame}, "
                                  f"but the input has {total} frames")

    def on_encoded(self, frame_idx: int, embedding: Any) -> None:
        if frame_idx in self.awaiting_encode:
            self.awaiting_encode.remove(frame_idx)
        if frame_idx in self.slots:
            self.embeddings[frame_idx] = embedding

    # -- scheduling -------------------------------------------------------------------------

    def schedule(self) -> list[Any]:
        commands: list[Any] = []
        for obj in self.objects.values():
            commands += self._schedule_forward(obj)
            commands += self._schedule_backward(obj)
        commands += self._schedule_publish()
        self._release_embeddings()
        return commands

    def _schedule_forward(self, obj: ObjectState) -> list[Any]:
        out: list[Any] = []
        for j in list(self.slots):
            if j < obj.first_frame or (obj.forward_cursor is not None and j <= obj.forward_cursor):
                continue
            embedding = self.embeddings.get(j)
            if embedding is None:
                break
            if not obj.created:
                obj.created = True
                out.append(c.OpenObject(self.key(obj.object_id), self.video_size))
            prompt = self._prompt_due(obj, j)
            if prompt is not None:
                obj.applied[j] = prompt
            out.append(c.Step(self.key(obj.object_id), j, embedding, prompt, FORWARD, tag=obj.object_id))
            obj.forward_cursor = j
            if obj.anchor is None:
                obj.anchor = j
            out += self._count_step(obj)
            out += self._maybe_branch_backward(obj)
        if self.input_ended and obj.forward_cursor is not None and obj.forward_cursor == self.last_admitted:
            out += self._maybe_branch_backward(obj, at_end=True)
        return out

    def _maybe_branch_backward(self, obj: ObjectState, at_end: bool = False) -> list[Any]:
        if (obj.backward_started or not self.bidirectional or obj.anchor is None
                or not (at_end or obj.forward_cursor >= obj.anchor + self.backward_delay)):
            return []
        if not any(k < obj.anchor for k in self.slots):
            return []  # nothing before the first prompt (or already published): no backward pass
        obj.backward_started = True
        obj.backward_cursor = obj.anchor
        obj.backward_branch = obj.forward_cursor
        return [c.BranchBackward(self.key(obj.object_id)), self._snapshot(obj)]

    def _schedule_backward(self, obj: ObjectState) -> list[Any]:
        out: list[Any] = []
        if not obj.backward_started:
            return out
        for j in sorted((k for k in self.slots if k < obj.backward_cursor), reverse=True):
            if j not in self.embeddings:
                break  # not encoded yet; backward steps must not skip a frame
            out.append(c.Step(self.key(obj.object_id), j, self.embeddings[j], None, BACKWARD, tag=obj.object_id))
            obj.backward_cursor = j
            out += self._count_step(obj)
        return out

    def _prompt_due(self, obj: ObjectState, frame_idx: int) -> Prompt | None:
        due = [f for f in obj.prompts if f <= frame_idx and f not in obj.applied
               and (obj.forward_cursor is None or f > obj.forward_cursor)]
        return obj.prompts[max(due)] if due else None

    def _count_step(self, obj: ObjectState) -> list[Any]:
        obj.steps_since_snapshot += 1
        return [self._snapshot(obj)] if obj.steps_since_snapshot >= self.snapshot_every else []

    def _snapshot(self, obj: ObjectState) -> c.Snapshot:
        obj.steps_since_snapshot = 0
        tag = SnapshotTag(obj.object_id, obj.forward_cursor, obj.backward_cursor if obj.backward_started else None)
        return c.Snapshot(self.key(obj.object_id), tag)

    def key(self, object_id: int) -> ObjectKey:
        return ObjectKey(self.stream_id, object_id)

    def _schedule_publish(self) -> list[Any]:
        out = []
        while self.slots:
            j, slot = next(iter(self.slots.items()))
            expected = self._expected_objects(j)
            if any(o not in slot.results for o in expected):
                break
            del self.slots[j]
            height, width = self.video_size or (0, 0)
            meta = FrameMeta(self.stream_id, j, slot.pts, width, height, slot.dropped_before)
            out.append(c.Publish(meta, slot.rgb if self.publish_pixels else None,
                                 tuple(slot.results[o] for o in sorted(expected))))
        return out

    # -- updates ----------------------------------------------------------------------------

    def on_step_done(self, object_id: int, frame_idx: int, result: Any) -> None:
        slot = self.slots.get(frame_idx)
        if slot is not None:
            slot.results[object_id] = result

    def on_snapshot_done(self, tag: SnapshotTag, snapshot: Any) -> None:
        obj = self.objects[tag.object_id]
        if obj.safe_forward is not None and tag.forward_frame is not None and tag.forward_frame < obj.safe_forward:
            return  # an older snapshot finishing late must not move the replay point back
        obj.snapshot, obj.safe_forward, obj.safe_backward = snapshot, tag.forward_frame, tag.backward_frame
        self._release_embeddings()

    def on_published(self) -> None:
        self.frames_published += 1

    def on_tracker_lost(self, object_id: int) -> list[Any]:
        """Commands that rebuild the object's actor from its last snapshot and replay the steps since."""
        obj = self.objects[object_id]
        if not obj.created:
            return []
        key = self.key(object_id)
        out: list[Any] = [c.OpenObject(key, self.video_size, snapshot=obj.snapshot)]
        start = obj.safe_forward if obj.snapshot is not None else None
        if obj.forward_cursor is not None:
            for j in sorted(k for k in self.embeddings if (start is None or k > start) and obj.anchor <= k <= obj.forward_cursor):
                out.append(c.Step(key, j, self.embeddings[j], obj.applied.get(j), FORWARD, tag=object_id))
                if j == obj.backward_branch:
                    out.append(c.BranchBackward(key))
        if obj.backward_started:
            top = obj.safe_backward if (obj.snapshot is not None and obj.safe_backward is not None) else obj.anchor
            for j in sorted((k for k in self.embeddings if obj.backward_cursor <= k < top), reverse=True):
                out.append(c.Step(key, j, self.embeddings[j], None, BACKWARD, tag=object_id))
        out.append(self._snapshot(obj))
        return out

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.input_ended and not self.slots

    def _complete(self, slot: FrameSlot) -> bool:
        return all(o in slot.results for o in self._expected_objects(slot.frame_idx))

    def _expected_objects(self, frame_idx: int) -> list[int]:
        return [o.object_id for o in self.objects.values() if self.bidirectional or frame_idx >= o.first_frame]

    def _needs_encoding(self, frame_idx: int) -> bool:
        return bool(self._expected_objects(frame_idx))

    def _parked(self, frame_idx: int) -> bool:
        """Waiting for a backward pass that has not started: outside the in-flight bound."""
        return self.bidirectional and any(not o.backward_started and frame_idx < o.first_frame
                                          for o in self.objects.values())

    def _unsnapshotted(self, obj: ObjectState) -> int:
        after = obj.safe_forward if obj.safe_forward is not None else obj.first_frame - 1
        return sum(1 for j in self.slots if j > after) + sum(1 for j in self.embeddings if j > after and j not in self.slots)

    def _needed(self, frame_idx: int) -> bool:
        for obj in self.objects.values():
            if frame_idx >= obj.first_frame:
                after = obj.safe_forward if obj.safe_forward is not None else obj.first_frame - 1
                if frame_idx > after:
                    return True
            elif self.bidirectional:
                if not obj.backward_started or obj.backward_cursor > frame_idx:
                    return True  # not stepped backward yet
                top = obj.safe_backward if obj.safe_backward is not None else obj.anchor
                if frame_idx < top:
                    return True  # stepped, but not yet covered by a snapshot
        return False

    def _release_embeddings(self) -> None:
        for j in [j for j in self.embeddings if not self._needed(j)]:
            del self.embeddings[j]
