"""Tracker actors: one process hosts many objects, from one or many streams, and steps them in batches.

Each object keeps its own trackers (forward and, for files, backward) and so its own memory bank;
the actor holds ONE tracking-only model copy for all of them. The object, not the actor, is the
unit of placement, snapshot and recovery: the executor opens an object on whichever actor the
placement policy picks, and reopens it from its last snapshot elsewhere when that actor dies.

One call, `run(ops, *refs)`, carries every operation the executor has for this actor in one
round, with the embeddings and snapshots the ops name as top-level arguments (`refs`, so Ray
resolves them; the ops name them by index). Steps of different objects that follow each other
go through the model as one batched step (`model.step_many`, grouped by memory shape inside, so
results equal one-by-one stepping); an op on an object that already has a step in the batch
closes the batch first, so every object still sees its own operations in order.

`run` returns the values `return_layout(ops)` describes: a tuple of `OpStatus` (`Statuses`, tiny:
the executor reads only this); then, when the call has steps or refines, ONE `ResultPack` of their
`ObjectResult`s that travels on by reference to the publishers (`PackedResult` names one of them;
both pickle as a few plain values, not one object each); then each snapshot's
`ObjectSnapshot` as a value of its own (kept for recovery long after the results are published).
One reference per call instead of one per object: with the null model, Ray's per-reference work in
the driver cost more than publishing. A failing op (a prompt outside the frame, say) fails alone:
its status carries the message and the other objects of the call go on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from masklet.actors.payloads import (ModelSpec, ObjectResult, Pick, ResultPack, as_embedding, one_line, picked,
                                     restore_tracker)
from masklet.actors.runtime import actor_pid, limit_threads, node_id, release_free_memory
from masklet.model.types import Prompt
from masklet.monitoring.stats import Stats

FORWARD = "forward"
BACKWARD = "backward"


@dataclass(frozen=True, order=True)
class ObjectKey:
    """One tracked object: `serial` tells incarnations of one live object id apart (0 for files)."""

    stream_id: str
    object_id: int
    serial: int = 0

    def __str__(self) -> str:
        return f"{self.stream_id}/{self.object_id}" + (f".{self.serial}" if self.serial else "")


# -- operations (ref fields name the positional refs of the `run` call: an index, or for an embedding
#    a `Pick`, (argument, place in that argument's pack or None)) -------------------------------


@dataclass(frozen=True)
class OpenObject:
    key: ObjectKey
    video_size: tuple[int, int]
    num_frames: Optional[int] = None
    snapshot: int = -1           # index of an ObjectSnapshot among the refs; -1: a fresh object


@dataclass(frozen=True)
class StepObject:
    key: ObjectKey
    direction: str
    frame_idx: int
    embedding: Pick              # the frame's embedding among the refs (an encoder call's pack, index)
    prompt: Optional[Prompt] = None


@dataclass(frozen=True)
class RefineObject:
    key: ObjectKey
    embedding: Pick
    prompt: Prompt


@dataclass(frozen=True)
class BranchBackward:
    key: ObjectKey


@dataclass(frozen=True)
class SnapshotObject:
    key: ObjectKey


@dataclass(frozen=True)
class CloseObject:
    key: ObjectKey


TrackerOp = Union[OpenObject, StepObject, RefineObject, BranchBackward, SnapshotObject, CloseObject]


def return_layout(ops: Sequence[TrackerOp]) -> tuple[int, dict[int, tuple[int, Optional[int]]]]:
    """How `run` returns the values of `ops`: (num_returns, {op index: (return slot, index or None)}).

    Slot 0 holds the statuses; slot 1 the tuple of step and refine results, in op order (index =
    place in that tuple), if there are any; each snapshot has the next slot of its own (index None).
    Other ops return nothing."""
    results = [i for i, op in enumerate(ops) if isinstance(op, (StepObject, RefineObject))]
    where: dict[int, tuple[int, Optional[int]]] = {i: (1, n) for n, i in enumerate(results)}
    slot = 2 if results else 1
    for i, op in enumerate(ops):
        if isinstance(op, SnapshotObject):
            where[i] = (slot, None)
            slot += 1
    return slot, where


@dataclass(frozen=True)
class OpStatus:
    error: Optional[str] = None   # one line; None: the op succeeded
    score: Optional[float] = None  # presence logit of a step/refine result


class Statuses(tuple):
    """A call's `OpStatus`es, pickled as one tuple of (error, score) pairs: Ray's pickler pays its
    per-object hook for every dataclass of a plain tuple (64 statuses: 0.15 ms, as pairs 0.006)."""

    def __reduce__(self) -> tuple:
        return _statuses, (tuple((s.error, s.score) for s in self),)


def _statuses(pairs: tuple) -> Statuses:
    return Statuses(OpStatus(error, score) for error, score in pairs)


@dataclass(frozen=True)
class ObjectSnapshot:
    """Everything an object needs to resume elsewhere: its trackers' `state_dict()`s."""

    forward_state: Optional[dict]
    forward_frame: Optional[int]    # last frame the forward tracker had stepped
    backward_state: Optional[dict]
    backward_frame: Optional[int]   # last frame the backward tracker had stepped (None: not started)


class HostedObject:
    """One object's trackers inside a tracker actor (shares the actor's model)."""

    def __init__(self, model: Any, key: ObjectKey, video_size: tuple[int, int], num_frames: Optional[int],
                 snapshot: Optional[ObjectSnapshot] = None) -> None:
        self.model, self.key = model, key
        self.video_size, self.num_frames = (int(video_size[0]), int(video_size[1])), num_frames
        self.forward: Any = None
        self.backward: Any = None
        self.last: dict[str, Optional[int]] = {FORWARD: None, BACKWARD: None}
        if snapshot is not None:
            if snapshot.forward_state is not None:
                self.forward = restore_tracker(model, snapshot.forward_state)
            if snapshot.backward_state is not None:
                self.backward = restore_tracker(model, snapshot.backward_state)
            self.last = {FORWARD: snapshot.forward_frame, BACKWARD: snapshot.backward_frame}

    def tracker_for(self, direction: str) -> Any:
        if direction == FORWARD:
            if self.forward is None:
                kwargs = {} if self.num_frames is None else {"num_frames": self.num_frames}
                self.forward = self.model.new_tracker(video_size=self.video_size, **kwargs)
            return self.forward
        if self.backward is None:
            raise RuntimeError(f"object {self.key}: backward step before the backward branch")
        return self.backward

    def branch_backward(self) -> None:
        if self.forward is None:
            raise RuntimeError(f"object {self.key}: backward branch before the first forward step")
        self.backward = self.forward.reverse_tracker()

    def snapshot(self) -> ObjectSnapshot:
        return ObjectSnapshot(
            None if self.forward is None else _detached(self.forward.state_dict()), self.last[FORWARD],
            None if self.backward is None else _detached(self.backward.state_dict()), self.last[BACKWARD])

    def memory_bytes(self) -> int:
        return sum(t.memory_bytes() for t in (self.forward, self.backward) if t is not None)


def _detached(state: Any) -> Any:
    """A deep copy on the host, so the snapshot does not alias tensors the tracker mutates later."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, np.ndarray):
        return state.copy()
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_detached(v) for v in state)
    return state


def _device_of(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except (StopIteration, AttributeError, TypeError):
        return "cpu"


def to_result(key: ObjectKey, mask_result: Any, video_size: tuple[int, int]) -> ObjectResult:
    low = mask_result.low_res_logits.detach().float().cpu().reshape(mask_result.low_res_logits.shape[-2:])
    return ObjectResult(key.object_id, int(mask_result.frame_idx), low.numpy(), float(mask_result.score),
                        float(mask_result.iou), video_size)


class TrackerActor:
    """Hosts objects; see the module docstring. `num_threads` caps intra-op threads (1 per actor on CPU)."""

    def __init__(self, spec: ModelSpec, num_threads: int | None = 1, *, model: Any = None,
                 max_step_batch: int = 8) -> None:
        limit_threads(num_threads)
        # Objects per forward pass: a pass's activations grow with it, and the allocator keeps its peak,
        # so this bounds a tracker process's memory whatever its object count.
        self.max_step_batch = max(1, int(max_step_batch))
        self._batched_since_trim = False
        self.model = model if model is not None else spec.build(with_image_encoder=False)
        self.device = _device_of(self.model)
        self.objects: dict[ObjectKey, HostedObject] = {}
        self.stats = Stats()
        self.batch_sizes: dict[int, int] = {}

    # -- the one entry point ----------------------------------------------------------------

    @torch.inference_mode()
    def run(self, ops: Sequence[TrackerOp], *refs: Any) -> tuple:
        statuses: list[OpStatus] = [OpStatus()] * len(ops)
        values: list[Any] = [None] * len(ops)
        embeddings: dict[Pick, Any] = {}
        batch: list[int] = []   # indices of pending StepObject ops, distinct objects

        self._prepare(ops, refs)

        def embedding(pick: Pick) -> Any:
            if pick not in embeddings:  # one conversion per frame, however many objects read it
                embeddings[pick] = self._embedding(picked(pick, refs))
            return embeddings[pick]

        def flush() -> None:
            if batch:
                self._step_batch([(i, ops[i]) for i in batch], embedding, statuses, values)
                batch.clear()

        for i, op in enumerate(ops):
            if any(ops[j].key == op.key for j in batch):
                flush()
            if isinstance(op, StepObject):
                batch.append(i)
                if len(batch) >= self.max_step_batch:
                    flush()
                continue
            try:
                values[i], statuses[i] = self._apply(op, refs, embedding)
            except Exception as exc:  # noqa: BLE001 - one object's failure is its own
                statuses[i] = OpStatus(error=one_line(exc))
        flush()
        if self._batched_since_trim:
            release_free_memory()  # a batched pass's activations, else kept resident (runtime.py)
            self._batched_since_trim = False
        count, where = return_layout(ops)
        if count == 1:
            return Statuses(statuses)  # one return value: the statuses themselves
        out: list[Any] = [Statuses(statuses)] + [None] * (count - 1)
        packed: list[Any] = [None] * sum(index is not None for _, index in where.values())
        for i, (slot, index) in where.items():
            if index is None:
                out[slot] = values[i]
            else:
                packed[index] = values[i]
        if packed:  # a failed op's result is None: such a (rare) call keeps a plain tuple
            out[1] = ResultPack.of(packed) if all(v is not None for v in packed) else tuple(packed)
        return tuple(out)

    def _prepare(self, ops: Sequence[TrackerOp], refs: Sequence[Any]) -> None:
        """Hook before a call's ops run (the shard actor encodes the frames they need here)."""

    def _embedding(self, value: Any) -> Any:
        return as_embedding(value, self.device)

    def _apply(self, op: TrackerOp, refs: Sequence[Any], embedding: Any) -> tuple[Any, OpStatus]:
        if isinstance(op, OpenObject):
            snapshot = refs[op.snapshot] if op.snapshot >= 0 else None
            self.objects[op.key] = HostedObject(self.model, op.key, op.video_size, op.num_frames, snapshot)
            return None, OpStatus()
        obj = self.objects.get(op.key)
        if obj is None:
            raise KeyError(f"object {op.key} is not hosted here")
        if isinstance(op, RefineObject):
            start = time.perf_counter()
            if obj.forward is None or obj.last[FORWARD] is None:
                raise RuntimeError(f"object {op.key}: refine before the first forward step")
            result = to_result(op.key, obj.forward.refine(embedding(op.embedding), op.prompt), obj.video_size)
            self.stats.observe("masklet_stage_latency_seconds", time.perf_counter() - start, stage="track")
            return result, OpStatus(score=result.score)
        if isinstance(op, BranchBackward):
            obj.branch_backward()
        elif isinstance(op, SnapshotObject):
            return obj.snapshot(), OpStatus()
        elif isinstance(op, CloseObject):
            del self.objects[op.key]
        else:  # pragma: no cover - an executor/actor mismatch is a bug
            raise TypeError(f"unknown tracker op {op!r}")
        return None, OpStatus()

    def _step_batch(self, batch: list[tuple[int, StepObject]], embedding: Any,
                    statuses: list[OpStatus], values: list[Any]) -> None:
        """Step distinct objects together; if the batched call fails, step them one by one so only
        the failing object reports the error."""
        start = time.perf_counter()
        ready: list[tuple[int, StepObject, HostedObject, Any]] = []
        for i, op in batch:
            try:
                obj = self.objects[op.key] if op.key in self.objects else None
                if obj is None:
                    raise KeyError(f"object {op.key} is not hosted here")
                ready.append((i, op, obj, obj.tracker_for(op.direction)))
            except Exception as exc:  # noqa: BLE001
                statuses[i] = OpStatus(error=one_line(exc))
        step_many = getattr(self.model, "step_many", None)
        results: Optional[list] = None
        if step_many is not None and len(ready) > 1:
            try:
                results = list(step_many([_request(t, op.frame_idx, embedding(op.embedding), op.prompt)
                                          for _, op, _, t in ready]))
            except Exception:  # noqa: BLE001 - find the culprit one by one below
                results = None
        for n, (i, op, obj, tracker) in enumerate(ready):
            try:
                raw = results[n] if results is not None else tracker.step(op.frame_idx, embedding(op.embedding),
                                                                          op.prompt)
                obj.last[op.direction] = op.frame_idx
                values[i] = to_result(op.key, raw, obj.video_size)
                statuses[i] = OpStatus(score=values[i].score)
            except Exception as exc:  # noqa: BLE001
                statuses[i] = OpStatus(error=one_line(exc))
        # One forward pass per batch when the model stepped them together, else one per object.
        passes = [len(ready)] if results is not None else [1] * len(ready)
        self._batched_since_trim |= results is not None
        for size in passes:
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
            self.stats.observe("masklet_tracker_batch_size", size)
        elapsed = time.perf_counter() - start
        for _ in ready:
            self.stats.observe("masklet_stage_latency_seconds", elapsed, stage="track")

    # -- housekeeping -----------------------------------------------------------------------

    def hosted(self) -> list[ObjectKey]:
        return sorted(self.objects)

    def report(self) -> dict:
        return {"batch_sizes": dict(self.batch_sizes), "objects": len(self.objects), "node": node_id(),
                "pid": actor_pid()}

    def stats_snapshot(self):
        self.stats.set("masklet_tracker_memory_bank_bytes", sum(o.memory_bytes() for o in self.objects.values()))
        self.stats.set("masklet_active_objects", len(self.objects))
        return self.stats.snapshot()

    def pid(self) -> int:
        return actor_pid()


def _request(tracker: Any, frame_idx: int, embedding: Any, prompt: Optional[Prompt]) -> Any:
    from masklet.model import StepRequest  # the model's batched-step request (masklet.model.batched_step)

    return StepRequest(tracker=tracker, frame_idx=frame_idx, embedding=embedding, prompt=prompt)
