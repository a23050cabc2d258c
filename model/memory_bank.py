"""Per-object memory bank: what the official predictor keeps in its `output_dict`, but bounded.

The official predictor keeps every frame's output forever (sam2 issues #196, #264). Memory attention
only ever reads:
  * conditioning frames (prompted frames),
  * the spatial memories of the previous `num_maskmem - 1` frames,
  * the object pointers of the previous `max_obj_ptrs_in_encoder - 1` frames,
where "previous" counts from the frame being processed. After frame k is stepped, two frames can be
processed next: k + 1 (reads k-5 ... k) and a correction of k itself (`refine`, reads k-6 ... k-1,
as the official predictor does for a click on an already tracked frame). So the bank keeps one spatial
memory and one pointer more than a step reads. Its size is constant on an endless stream.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass(frozen=True)
class MemoryEntry:
    """One frame's contribution to an object's memory.

    memory:        bf16 [1, mem_dim, S/16, S/16] spatial memory (None once trimmed to a pointer-only entry).
                   Stored in bf16 exactly as the official predictor does, which also halves its size.
    object_pointer: [1, hidden_dim] decoder output token projected by obj_ptr_proj.
    presence_logit: [1, 1] object-presence logit of that frame.
    low_res_logits: [1, 1, S/4, S/4] mask logits (kept for conditioning frames only; refine uses them).
    """

    frame_idx: int
    memory: Optional[torch.Tensor]
    object_pointer: torch.Tensor
    presence_logit: torch.Tensor
    low_res_logits: Optional[torch.Tensor] = None

    def without_memory(self) -> "MemoryEntry":
        return MemoryEntry(self.frame_idx, None, self.object_pointer, self.presence_logit, None)

    def tensors(self) -> Iterator[torch.Tensor]:
        for t in (self.memory, self.object_pointer, self.presence_logit, self.low_res_logits):
            if t is not None:
                yield t


class MemoryBank:
    """Bounded memory of one tracked object.

    num_spatial / num_pointers: how many previous frames' spatial memories / object pointers one step
    reads (num_maskmem - 1 and max_obj_ptrs_in_encoder - 1).
    conditioning:  frame_idx -> entry, at most `max_conditioning` (the first and newest always kept).
    recent:        the newest non-conditioning frames in stepping order, at most `kept_pointers`
                   (= num_pointers + 1); the newest `kept_spatial` (= num_spatial + 1) keep their spatial
                   memory, older ones only their object pointer. The one extra of each serves `refine`
                   of the newest frame, which reads one frame further back than the next step does.
    """

    def __init__(self, num_spatial: int, num_pointers: int, max_conditioning: int) -> None:
        if num_spatial > num_pointers:
            raise ValueError("num_spatial must not exceed num_pointers")
        self.num_spatial = num_spatial
        self.num_pointers = num_pointers
        self.kept_spatial = num_spatial + 1
        self.kept_pointers = num_pointers + 1
        self.max_conditioning = max_conditioning
        self.conditioning: OrderedDict[int, MemoryEntry] = OrderedDict()
        self.recent: OrderedDict[int, MemoryEntry] = OrderedDict()

    # ---- updates -------------------------------------------------------------------------------
    def add_conditioning(self, entry: MemoryEntry) -> None:
        """Add (or replace) a prompted frame. A frame is never both conditioning and recent."""
        self.recent.pop(entry.frame_idx, None)
        self.conditioning.pop(entry.frame_idx, None)
        self.conditioning[entry.frame_idx] = entry
        while len(self.conditioning) > self.max_conditioning:
            # Evict the oldest conditioning frame other than the first prompt (it anchors the object).
            first = next(iter(self.conditioning))
            victim = next(k for k in self.conditioning if k != first)
            del self.conditioning[victim]

    def add_recent(self, entry: MemoryEntry) -> None:
        self.recent.pop(entry.frame_idx, None)
        self.recent[entry.frame_idx] = entry
        while len(self.recent) > self.kept_pointers:
            self.recent.popitem(last=False)
        # Entries older than the spatial window only need their pointer.
        for i, (frame_idx, old) in enumerate(self.recent.items()):
            if i >= len(self.recent) - self.kept_spatial:
                break
            if old.memory is not None:
                self.recent[frame_idx] = old.without_memory()

    # ---- lookups -------------------------------------------------------------------------------
    def spatial_memory_at(self, frame_idx: int) -> Optional[MemoryEntry]:
        entry = self.recent.get(frame_idx)
        return entry if entry is not None and entry.memory is not None else None

    def pointer_at(self, frame_idx: int) -> Optional[MemoryEntry]:
        return self.recent.get(frame_idx)

    @property
    def has_conditioning(self) -> bool:
        return bool(self.conditioning)

    def nbytes(self) -> int:
        entries = list(self.conditioning.values()) + list(self.recent.values())
        return sum(t.numel() * t.element_size() for e in entries for t in e.tensors())

    def __len__(self) -> int:
        return len(self.conditioning) + len(self.recent)

    # ---- serialisation (plain tensors and ints only: safe for torch.load(weights_only=True)) ----
    def state_dict(self) -> dict:
        def pack(entries: OrderedDict[int, MemoryEntry]) -> list[dict]:
            return [
                {
                    "frame_idx": e.frame_idx,
                    "memory": e.memory,
                    "object_pointer": e.object_pointer,
                    "presence_logit": e.presence_logit,
                    "low_res_logits": e.low_res_logits,
                }
                for e in entries.values()
            ]

        return {
            "num_spatial": self.num_spatial,
            "num_pointers": self.num_pointers,
            "max_conditioning": self.max_conditioning,
            "conditioning": pack(self.conditioning),
            "recent": pack(self.recent),
        }

    @classmethod
    def from_state(cls, state: dict) -> "MemoryBank":
        bank = cls(state["num_spatial"], state["num_pointers"], state["max_conditioning"])
        for item in state["conditioning"]:
            bank.conditioning[item["frame_idx"]] = MemoryEntry(**item)
        for item in state["recent"]:
            bank.recent[item["frame_idx"]] = MemoryEntry(**item)
        return bank

    def copy(self) -> "MemoryBank":
        # Entries are immutable, so a shallow copy of the two dicts is a full copy.
        bank = MemoryBank(self.num_spatial, self.num_pointers, self.max_conditioning)
        bank.conditioning = OrderedDict(self.conditioning)
        bank.recent = OrderedDict(self.recent)
        return bank
