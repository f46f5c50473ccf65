"""Online backends for ``omni_ray.runner.run_pipeline``: stage calls through Serve handles.

The same step runner drives the offline ``OmniLLM``; here each stage is a deployment handle and
each request a typed ``ARRequest`` / ``DiTRequest``, sent as it is. Hidden states come back from
the AR stage as a ``Handoff`` holding an ObjectRef, passed on, unresolved, to the DiT stage.
Streaming calls are cancelled when the consumer stops early (client disconnect), which raises
CancelledError in the replica and aborts the engine request.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from ray.serve.handle import DeploymentHandle

from deployments.ingress.call_batcher import StreamBatcher
from omni_ray.stages.requests import ARRequest, DiTRequest, Handoff


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
    """``cache`` (a DiTCacheClient) makes ``encode`` a cached call: a prompt whose hidden states are
    in the object store already skips the AR stage (the DiT gets the cached reference)."""

    def __init__(self, handle: DeploymentHandle, cache=None, model: str | None = None, batch: int = 1):
        self.unary = handle.options(stream=False)
        self.streaming = handle.options(stream=True)
        self.cache, self.model = cache, model
        self._puts: set[asyncio.Task] = set()
        self.batcher = StreamBatcher(self.streaming, self.unary, batch) if batch > 1 else None

    def generate(self, req: ARRequest) -> AsyncIterator[dict]:
        """``req``'s deltas: through the batcher (requests arriving together share a call), or one call."""
        if self.batcher is not None:
            return self.batcher.stream(req)
        return stream(self.streaming.generate.remote(req))

    async def complete(self, req: ARRequest) -> dict:
        if self.batcher is not None:
            return await self.batcher.complete(req)
        return await unary(self.unary.complete.remote(req))

    async def encode(self, req: ARRequest) -> Handoff:
        """The stage's Handoff (its ref unresolved), ``cache`` set to hit | miss | off."""
        key = None
        if self.cache is not None:
            from omni_ray.cluster.dit_cache import hidden_states_key
            key = hidden_states_key(self.model, req)
            hit = await self.cache.get_entry(key)
            if hit is not None and hit[1]:
                ref, meta = hit
                return Handoff(**meta, ref=ref, object_id=ref.hex(), cache="hit")
        out: Handoff = await unary(self.unary.encode.remote(req))
        if key is not None:           # index it in the background: the caller does not wait for the copy
            meta = {"shape": out.shape, "dtype": out.dtype, "source": out.source}
            task = asyncio.ensure_future(self.cache.put_ref(key, out.ref, meta=meta, model=self.model))
            self._puts.add(task)
            task.add_done_callback(self._puts.discard)
        return dataclasses.replace(out, cache="miss" if key else "off")


class RemoteDiT:
    def __init__(self, handle: DeploymentHandle):
        self.streaming = handle.options(stream=True)

    def generate(self, req: DiTRequest) -> AsyncIterator[dict]:
        return stream(self.streaming.generate.remote(req))
