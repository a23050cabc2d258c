"""Which consumed offsets are done, so that commits never skip one whose output is not yet safe."""
from __future__ import annotations

TP = tuple[str, int]


class OffsetBook:
    """Per partition: which consumed offsets are not done yet; the commit position is the lowest
    of those (or one past the highest consumed when all are done)."""

    def __init__(self) -> None:
        self._open: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}

    def consumed(self, tp: TP, offset: int) -> None:
        self._open.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TP, offset: int) -> None:
        self._open.get(tp, set()).discard(offset)

    def positions(self) -> dict[TP, int]:
        return {tp: min(self._open[tp]) if self._open.get(tp) else nxt for tp, nxt in self._next.items()}

    def to_commit(self) -> dict[TP, int]:
        return {tp: pos for tp, pos in self.positions().items() if pos > self._committed.get(tp, -1)}

    def committed(self, positions: dict[TP, int]) -> None:
        self._committed.update(positions)

    def forget(self, tps: list[TP]) -> None:
        for tp in tps:
            self._open.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
