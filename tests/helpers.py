"""Small helpers shared by test modules: a free TCP port, a local Ray cluster, a fake Serve stream call."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_CPUS = 8          # logical CPUs of the tests' Ray cluster: room for the apps a package deploys side by side


@contextlib.contextmanager
def local_ray(num_cpus: int = RAY_CPUS):
    """A local Ray cluster for the block, shut down after it unless someone else had started one."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()


def serve_running() -> bool:
    """Whether a Serve instance (its controller actor) runs on the connected Ray cluster."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def local_serve():
    """Serve on the connected Ray cluster for the block; yields its HTTP port. Shares an instance that
    runs already (and leaves it running), else starts one on a free port and shuts it down after."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    started = not serve_running()
    if started:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        yield ray.get(_get_global_client()._controller.get_http_config.remote()).port
    finally:
        if started:
            serve.shutdown()


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
