"""Online backends for ``omni_ray.runner.run_pipeline``: stage calls through Serve handles.

The same step runner drives the offline ``OmniLLM``; here each stage is a deployment handle and
each request a typed ``ARRequest`` / ``DiTRequest``, sent as it is. Hidden states come back from
the AR stage as a ``Handoff`` holding an ObjectRef, passed on, unresolved, to the DiT stage.
Streaming calls are cancelled when the consumer stops early (client disconnect), which raises
CancelledError in the replica and aborts the engine request.

Every call goes through the ingress's StageHealth (``stage_health.py``): while the stage has no
healthy replica it waits a bounded time, then 503; a call that loses its replica marks the stage
down. A client error comes back from the replica as a value (deployments/stages/replica.py) and is
raised here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from ray.serve.handle import DeploymentHandle

from deployments.ingress.call_batcher import StreamBatcher
from deployments.ingress.stage_health import StageHealth
from omni_ray.stages.requests import ARRequest, DiTRequest, Handoff


async def stream(call) -> AsyncIterator:
    """Iterate a streaming handle call; cancel it if the consumer goes away first."""
    done = False
    try:
        async for item in call:
            if isinstance(item, BaseException):      # a client error, sent as the last item
                done = True
                raise item
            yield item
        done = True
    finally:
        if not done:
            call.cancel()


async def unary(resp):
    """Await a unary handle call; cancel it if the caller is cancelled first."""
    try:
        out = await resp
    except BaseException:
        resp.cancel()
        raise
    if isinstance(out, BaseException):               # a client error, sent as the result
        raise out
    return out


class RemoteAR:
    """``cache`` (a DiTCacheClient) makes ``encode`` a cached call: a prompt whose hidden states are
    in the object store already skips the AR stage (the DiT gets the cached reference)."""

    def __init__(self, handle: DeploymentHandle, cache=None, model: str | None = None, batch: int = 1,
                 stage: str = "llm", health: StageHealth | None = None):
        self.stage, self.health = stage, health or StageHealth({stage: handle})
        self.unary = handle.options(stream=False)
        self.streaming = handle.options(stream=True)
        self.cache, self.model = cache, model
        self._puts: set[asyncio.Task] = set()
        self.batcher = StreamBatcher(self.streaming, self.unary, batch) if batch > 1 else None

    def generate(self, req: ARRequest) -> AsyncIterator[dict]:
        """``req``'s deltas: through the batcher (requests arriving together share a call), or one call."""
        if self.batcher is not None:
            return self.health.stream(self.stage, lambda: self.batcher.stream(req))
        return self.health.stream(self.stage, lambda: stream(self.streaming.generate.remote(req)))

    async def complete(self, req: ARRequest) -> dict:
        if self.batcher is not None:
            return await self.health.unary(self.stage, lambda: self.batcher.complete(req))
        return await self.health.unary(self.stage, lambda: unary(self.unary.complete.remote(req)))

    async def encode(self, req: ARRequest) -> Handoff:
        """The stage's Handoff (its ref unresolved), ``cache`` set to hit | miss | off."""
        return (await self.encode_batch([req]))[0]

    async def encode_batch(self, reqs: list[ARRequest]) -> list[Handoff]:
        """``encode`` of each request (a prompt and its negative prompt); the cache misses go to the
        stage in one call, so that one replica runs them in one engine step."""
        keys: list[str | None] = [None] * len(reqs)
        outs: list[Handoff | None] = [None] * len(reqs)
        if self.cache is not None:
            from omni_ray.cluster.dit_cache import hidden_states_key
            for i, req in enumerate(reqs):
                keys[i] = hidden_states_key(self.model, req)
                hit = await self.cache.get_entry(keys[i])
                if hit is not None and hit[1]:
                    ref, meta = hit
                    outs[i] = Handoff(**meta, ref=ref, object_id=ref.hex(), cache="hit")
        todo = [i for i, o in enumerate(outs) if o is None]
        if len(todo) == 1:
            got = [await self.health.unary(self.stage, lambda: unary(self.unary.encode.remote(reqs[todo[0]])))]
        elif todo:
            misses = [reqs[i] for i in todo]
            got = await self.health.unary(self.stage, lambda: unary(self.unary.encode_batch.remote(misses)))
        else:
            got = []
        for i, out in zip(todo, got):
            if keys[i] is not None:   # index it in the background: the caller does not wait for the copy
                meta = {"shape": out.shape, "dtype": out.dtype, "source": out.source}
                task = asyncio.ensure_future(self.cache.put_ref(keys[i], out.ref, meta=meta, model=self.model))
                self._puts.add(task)
                task.add_done_callback(self._puts.discard)
            outs[i] = dataclasses.replace(out, cache="miss" if keys[i] else "off")
        return outs


class RemoteDiT:
    def __init__(self, handle: DeploymentHandle, stage: str = "image", health: StageHealth | None = None):
        self.stage, self.health = stage, health or StageHealth({stage: handle})
        self.streaming = handle.options(stream=True)

    def generate(self, req: DiTRequest) -> AsyncIterator[dict]:
        return self.health.stream(self.stage, lambda: stream(self.streaming.generate.remote(req)))
