"""The waiting line of one stage: FIFO, or weighted fair queueing over priority classes.

``priority`` is start-time fair queueing: a request of class c gets the tag
``start = max(vtime, last[c])``, ``finish = start + 1 / weight[c]`` and the smallest finish tag is
served first (ties: higher class, then arrival). While all classes are backlogged they get
grants in proportion to their weights (4:2:1 by default), so high goes mostly first and low is
never starved; ``vtime`` follows the served tags, so a class that was idle cannot bank credit.
``fifo`` uses the arrival number as the tag. Removal (cancellation) is lazy: O(1).
"""

from __future__ import annotations

from collections import deque

PRIORITIES = ("high", "normal", "low")


class FairQueue:
    def __init__(self, policy: str, weights: dict[str, float]):
        self.policy = policy
        self.weights = weights
        self.lines: dict[str, deque] = {p: deque() for p in PRIORITIES}   # (tag, start, seq, rid)
        self.last = dict.fromkeys(PRIORITIES, 0.0)
        self.vtime = 0.0
        self.seq = 0
        self.alive: dict[str, tuple[int, str]] = {}                        # rid -> (seq, priority)

    def __len__(self) -> int:
        return len(self.alive)

    def __contains__(self, rid: str) -> bool:
        return rid in self.alive

    def push(self, rid: str, priority: str) -> None:
        self.seq += 1
        if self.policy == "fifo":
            start = tag = float(self.seq)
        else:
            start = max(self.vtime, self.last[priority])
            tag = self.last[priority] = start + 1.0 / self.weights[priority]
        self.lines[priority].append((tag, start, self.seq, rid))
        self.alive[rid] = (self.seq, priority)

    def remove(self, rid: str) -> bool:
        return self.alive.pop(rid, None) is not None

    def pop(self) -> str | None:
        best = None
        for rank, p in enumerate(PRIORITIES):
            line = self._clean(p)
            if line and (best is None or (line[0][0], rank) < best[0]):
                best = ((line[0][0], rank), p)
        if best is None:
            return None
        tag, start, seq, rid = self.lines[best[1]].popleft()
        del self.alive[rid]
        if self.policy != "fifo":
            self.vtime = max(self.vtime, start)
        return rid

    def depth(self) -> dict[str, int]:
        out = dict.fromkeys(PRIORITIES, 0)
        for _, p in self.alive.values():
            out[p] += 1
        return out

    def _clean(self, p: str) -> deque:
        """Drop removed entries from the head of a class's line."""
        line = self.lines[p]
        while line and self.alive.get(line[0][3], (None,))[0] != line[0][2]:
            line.popleft()
        return line
