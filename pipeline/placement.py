"""Placement: which actor process hosts which stream or object.

Decoders and publishers host streams; tracker actors host objects. A pool packs members onto its
actors up to `capacity` each, preferring an actor that already hosts a member of the same group
(the same stream: its objects share embeddings and batch together), then the least loaded one,
and starts a new actor only when every actor is full. A pool may first spread its members over up to
`spread_first` actors (each member gets one of its own until that many exist): publishing is the
CPU-heaviest per-stream stage, and two streams on one publisher use one core (measured:
bench/objects_bench.py's ceiling, 2 streams x 8 objects, 0.77x -> 0.92x the least-work loop with a
second publisher). Actors stay in the pool when their members leave, so an archive of many short
inputs, or live streams coming and going, reuse the same processes: no process per object, and none
per input. Capacity 1 gives one actor per member.

On Ray, new actors of a pool are spread over the cluster's nodes (`ActorOptions.spread`), and a
pool's `resources` can pin a role to a node group (GPU nodes for encoders, CPU nodes for trackers).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Optional, TypeVar

from masklet.actors.backend import ActorHandle

M = TypeVar("M", bound=Hashable)


@dataclass
class _Slot:
    actor: ActorHandle
    members: set = field(default_factory=set)


class ActorPool(Generic[M]):
    def __init__(self, role: str, spawn: Callable[[str], ActorHandle], capacity: int, spread_first: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"{role} capacity must be at least 1, got {capacity}")
        if spread_first < 1:
            raise ValueError(f"{role} spread_first must be at least 1, got {spread_first}")
        self.role = role
        self.capacity = capacity
        self.spread_first = spread_first
        self._spawn = spawn
        self._names = itertools.count()
        self._slots: list[_Slot] = []
        self._where: dict[M, _Slot] = {}
        self._group: dict[M, Hashable] = {}

    def place(self, member: M, group: Hashable = None) -> ActorHandle:
        """The actor hosting `member`, choosing (or starting) one if it has none yet."""
        slot = self._where.get(member)
        if slot is None:
            slot = self._choose(group)
            slot.members.add(member)
            self._where[member] = slot
            self._group[member] = group
        return slot.actor

    def _choose(self, group: Hashable) -> _Slot:
        open_slots = [s for s in self._slots if len(s.members) < self.capacity]
        if group is not None:
            same = [s for s in open_slots if any(self._group.get(m) == group for m in s.members)]
            if same:
                return min(same, key=lambda s: len(s.members))
        least = min(open_slots, key=lambda s: len(s.members), default=None)
        if least is not None and (not least.members or len(self._slots) >= self.spread_first):
            return least
        slot = _Slot(self._spawn(f"{self.role}-{next(self._names)}"))
        self._slots.append(slot)
        return slot

    def warm(self) -> None:
        """Start the pool's first actor ahead of its first member."""
        if not self._slots:
            self._slots.append(_Slot(self._spawn(f"{self.role}-{next(self._names)}")))

    def actor_of(self, member: M) -> Optional[ActorHandle]:
        slot = self._where.get(member)
        return None if slot is None else slot.actor

    def release(self, member: M) -> None:
        slot = self._where.pop(member, None)
        self._group.pop(member, None)
        if slot is not None:
            slot.members.discard(member)

    def members_of(self, actor: ActorHandle) -> list[M]:
        return sorted((m for m, s in self._where.items() if s.actor is actor), key=repr)

    def remove_actor(self, actor: ActorHandle) -> list[M]:
        """Forget a dead actor; returns the members it hosted (now homeless)."""
        lost = self.members_of(actor)
        for member in lost:
            self.release(member)
        self._slots = [s for s in self._slots if s.actor is not actor]
        return lost

    @property
    def actors(self) -> list[ActorHandle]:
        return [s.actor for s in self._slots]

    def load(self) -> dict[str, int]:
        return {s.actor.name: len(s.members) for s in self._slots}

    def __contains__(self, member: Any) -> bool:
        return member in self._where
