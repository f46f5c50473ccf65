"""Which requests step together.

``waiting`` is a FIFO of validated requests; a request is admitted (its latents allocated) when
the running set has room for its images (``max_batch_size``, counted before CFG doubling). Each
step runs one group of running requests with the same key (latent size; caption length for
families without caption masks): the group that has waited longest since it last ran.
"""

from __future__ import annotations

from collections import deque

from omni_ray.dit.request import DiTRequest, Status


class Batcher:
    def __init__(self, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.waiting: deque[DiTRequest] = deque()
        self.running: list[DiTRequest] = []
        self.tick = 0

    def add(self, req: DiTRequest) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def running_images(self) -> int:
        return sum(r.num_images for r in self.running)

    def admit(self) -> list[DiTRequest]:
        """Pop the waiting requests that fit now (FIFO); the caller prepares and ``start``s them."""
        room = self.max_batch_size - self.running_images
        out = []
        while self.waiting and self.waiting[0].num_images <= room:
            req = self.waiting.popleft()
            room -= req.num_images
            out.append(req)
        return out

    def start(self, req: DiTRequest) -> None:
        req.status = Status.RUNNING
        self.running.append(req)

    def schedule(self) -> list[DiTRequest]:
        """The next batch: the least recently served group of compatible running requests."""
        if not self.running:
            return []
        groups: dict[tuple, list[DiTRequest]] = {}
        for r in self.running:
            groups.setdefault(r.batch_key, []).append(r)
        batch = min(groups.values(), key=lambda g: (min(r.last_served for r in g), min(r.arrival for r in g)))
        for r in batch:
            r.last_served = self.tick
        self.tick += 1
        return batch

    def remove(self, req: DiTRequest) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
