"""A live object's incarnations and the slots its results fill (used by `pipeline.live_state`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from masklet.model.types import Prompt


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
    opened: bool = False                         # an OpenObject went to the executor for this generation
    seq: int = 0                                 # results issued; the newest of a frame wins
    steps_since_snapshot: int = 0
    snapshot: Any = None
    snapshot_frame: int | None = None
    # After a tracker loss: frames up to here are replayed for memory only (their published results
    # stand), except those whose revision was still pending when the tracker died.
    replay_until: int | None = None
    revise_on_replay: set[int] = field(default_factory=set)

    def covers(self, frame_idx: int) -> bool:
        return self.start <= frame_idx and (self.end is None or frame_idx < self.end)


@dataclass
class ResultSlot:
    serial: int
    generations: set[int]           # tracker generations whose results count (see on_tracker_lost)
    seq: int = -1
    value: Any = None               # reference to the newest completed ObjectResult
    score: float = 0.0
    outstanding: int = 0


def newest_due(held: dict[int, Prompt], frame_idx: int) -> Prompt | None:
    """Pop every held prompt for frames <= frame_idx and return the newest (a dropped or failed frame
    passes its prompt on to the next processed one)."""
    due = sorted(f for f in held if f <= frame_idx)
    if not due:
        return None
    prompt = held[due[-1]]
    for f in due:
        del held[f]
    return prompt
