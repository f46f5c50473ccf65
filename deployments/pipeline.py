"""Online backends for ``omni_ray.pipeline.run_pipeline``: stage calls through Serve handles.

The same step runner drives the offline ``OmniLLM``; here each stage is a deployment handle.
Hidden states come back from the AR stage as ``{"ref": [ObjectRef], "shape": ...}`` and are passed
on, unresolved, to the DiT stage. Streaming calls are cancelled when the consumer stops early
(client disconnect), which raises CancelledError in the replica and aborts the engine request.
"""

from __future__ import annotations

from typing import AsyncIterator

from ray.serve.handle import DeploymentHandle


async def stream(call) -> AsyncIterator:
    """Iterate a streaming handle call; cancel it if the consumer goes away first."""
    done = False
    try:
        async for item in call:
            yield item
        done = True
    finally:
        if not done:
            call.cancel()


async def unary(resp):
    """Await a unary handle call; cancel it if the caller is cancelled first."""
    try:
        return await resp
    except BaseException:
        resp.cancel()
        raise


class RemoteAR:
    def __init__(self, handle: DeploymentHandle):
        self.unary = handle.options(stream=False)
        self.streaming = handle.options(stream=True)

    def generate(self, req: dict) -> AsyncIterator[dict]:
        return stream(self.streaming.generate.remote(req))

    async def complete(self, req: dict) -> dict:
        return await unary(self.unary.complete.remote(req))

    async def encode(self, req: dict) -> dict:
        return await unary(self.unary.encode.remote(req))   # {"ref": [ObjectRef], ...}: the ref stays unresolved


class RemoteDiT:
    def __init__(self, handle: DeploymentHandle):
        self.streaming = handle.options(stream=True)

    def generate(self, req: dict, hidden: dict | None = None) -> AsyncIterator[dict]:
        return stream(self.streaming.generate.remote(req, hidden))
