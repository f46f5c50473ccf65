"""Keep objects a replica put in the object store alive for a while after it handed them out.

A stage that returns ``{"ref": [ray.put(x)]}`` through a Serve handle relies on Ray counting the
caller (and whoever it passes the ref to) as a borrower. Serve returns results through streaming
generators, and refs nested in streamed items can lose that count (ray-project/ray#58080, open
PR #58082): under load the owner frees the object before the next stage reads it, and the
request fails with ReferenceCountingAssertionError. Until Ray fixes it, the owner pins what it
hands out: for ``ttl_s`` (enough for the next stage to read it or copy it into the DiT cache), and
at most ``max_bytes`` in all (oldest pins go first).

    pins = Pins(ttl_s=120, max_bytes=256 << 20)
    ref = ray.put(array); pins.hold(ref, array.nbytes)
"""

from __future__ import annotations

import time
from collections import deque


class Pins:
    def __init__(self, ttl_s: float = 120.0, max_bytes: int = 256 << 20, clock=time.monotonic):
        self.ttl_s, self.max_bytes, self.clock = ttl_s, max_bytes, clock
        self._held: deque = deque()          # (expiry, ref, nbytes), oldest first
        self.bytes = 0

    def hold(self, ref, nbytes: int) -> None:
        self._held.append((self.clock() + self.ttl_s, ref, nbytes))
        self.bytes += nbytes
        self.prune()

    def prune(self) -> None:
        now = self.clock()
        while self._held and (self._held[0][0] <= now or self.bytes > self.max_bytes):
            _, _, n = self._held.popleft()
            self.bytes -= n

    def __len__(self) -> int:
        return len(self._held)
