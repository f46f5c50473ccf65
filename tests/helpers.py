"""Small helpers shared by test modules: a free TCP port, a local Ray cluster, a fake Serve stream call."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray(num_cpus: int = 4):
    """A local Ray cluster for the block, shut down after it unless someone else had started one."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


class FakeCall:
    """A streaming Serve call: iterates the replica's generator in the caller's task (as Serve's stream
    would deliver it); ``cancel`` records what Serve's cancellation does to the replica side."""

    def __init__(self, agen):
        self.agen, self.cancelled = agen, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self):
        self.cancelled = True
