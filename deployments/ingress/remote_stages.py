"""Online backends for ``omni_ray.runner.run_pipeline``: stage calls through Serve handles.

The same step runner drives the offline ``OmniLLM``; here each stage is a deployment handle and
each request a typed ``ARRequest`` / ``DiTRequest``, sent as it is. Hidden states come back from
the AR stage as a ``Handoff`` holding an ObjectRef, passed on, unresolved, to the DiT stage.
Streaming calls are cancelled when the consumer stops early (client disconnect), which raises
CancelledError in the replica and aborts the engine request.

Speech stages (talker, token2wav) are fed while they stream: the stage's first item names the replica
that runs the request, and each ``feed`` for it waits until that is known, then goes there
(``replica=id``: the PinnedRouter), one at a time in call order. Nothing is resolved here: the thinker's
hidden states pass as the Handoffs (ObjectRefs) they came as.

Every call goes through the ingress's StageHealth (``stage_health.py``): while the stage has no
healthy replica it waits a bounded time, then 503; a call that loses its replica marks the stage
down. A client error comes back from the replica as a value (deployments/stages/replica.py) and is
raised here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any, AsyncIterator

from ray.serve.handle import DeploymentHandle

from deployments.ingress.call_batcher import StreamBatcher
from deployments.ingress.stage_health import StageHealth
from omni_ray.stages.requests import ARRequest, DiTRequest, Handoff

if TYPE_CHECKING:
    from omni_ray.stages.requests import SpeechRequest, TalkerRequest, ThinkerRows

FEED_WAIT_S = 300.0     # a feed waits this long for its request's stream to name its replica
FORGET_S = 30.0         # an ended stream's replica is remembered this long (late feeds are dropped)


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

    async def thinker_prompt(self, req: ARRequest) -> tuple[list[int], Any, int]:
        """(prompt token ids, M-RoPE positions [3, L] or None, rope delta) of a thinker request as the stage
        processes it (a speech request's talker prompt; omni_ray/runner_speech.py)."""
        return await self.health.unary(self.stage, lambda: unary(self.unary.thinker_prompt.remote(req)))

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


class _Fed:
    """A stage whose requests are fed while they stream: ``generate(req)`` streams (the replica's first
    item, ``{"replica": id}``, kept here), ``feed(request_id, *args)`` goes to that replica, in call order."""

    def __init__(self, handle: DeploymentHandle, stage: str, health: StageHealth | None = None):
        self.stage, self.health = stage, health or StageHealth({stage: handle})
        self.streaming = handle.options(stream=True)
        self.unary = handle.options(stream=False)
        self._replicas: dict[str, asyncio.Future] = {}     # request id -> its replica id (None: it ended)
        self._locks: dict[str, asyncio.Lock] = {}
        self._done: set[str] = set()                      # streams that ended: their feeds are dropped

    def _replica(self, request_id: str) -> asyncio.Future:
        if request_id not in self._replicas:
            self._replicas[request_id] = asyncio.get_running_loop().create_future()
            self._locks[request_id] = asyncio.Lock()
        return self._replicas[request_id]

    def _forget(self, request_id: str, fut: asyncio.Future) -> None:
        if self._replicas.get(request_id) is fut:
            del self._replicas[request_id]
            self._locks.pop(request_id, None)
            self._done.discard(request_id)

    def _ended(self, request_id: str) -> None:
        fut = self._replica(request_id)
        self._done.add(request_id)
        if not fut.done():
            fut.set_result(None)                  # feeds still waiting: nothing to feed any more
        asyncio.get_running_loop().call_later(FORGET_S, self._forget, request_id, fut)

    async def generate(self, req) -> AsyncIterator[dict]:
        """The stage's items (the replica's id is not passed on)."""
        where = self._replica(req.request_id)
        try:
            async for item in self.health.stream(self.stage, lambda: stream(self.streaming.generate.remote(req))):
                if not where.done() and isinstance(item, dict) and "replica" in item:
                    where.set_result(item["replica"])
                    continue
                yield item
        finally:
            self._ended(req.request_id)

    async def feed(self, request_id: str, *args: Any) -> None:
        """Send ``args`` to the replica running ``request_id``'s stream, once it is known (a stream that
        ended, or never started within FEED_WAIT_S, takes no more feeds: they are dropped)."""
        fut = self._replica(request_id)
        lock = self._locks[request_id]
        async with lock:                          # FIFO: feeds reach the replica in the order they were made
            try:
                replica = await asyncio.wait_for(asyncio.shield(fut), FEED_WAIT_S)
            except TimeoutError:
                self._forget(request_id, fut)
                return
            if replica is None or request_id in self._done:
                return
            await self.health.unary(self.stage, lambda: unary(
                self.unary.feed.remote(request_id, *args, replica=replica)))


class RemoteTalker(_Fed):
    """The talker stage: ``generate(TalkerRequest)`` -> codec deltas; ``feed(request_id, ThinkerRows)``;
    ``voices`` (the checkpoint's spk_dict.pt, read once here: the runner checks a request's voice before any
    stage runs)."""

    def __init__(self, handle: DeploymentHandle, stage: str, health: StageHealth | None = None,
                 path: str | None = None):
        super().__init__(handle, stage, health)
        self.path = path

    @property
    def voices(self) -> list[str]:
        from omni_ray.stages.voices import speech_voices
        return speech_voices(self.path)

    def generate(self, req: TalkerRequest) -> AsyncIterator[dict]:
        return super().generate(req)

    async def feed(self, request_id: str, rows: ThinkerRows) -> None:
        await super().feed(request_id, rows)


class RemoteToken2Wav(_Fed):
    """The token2wav stage: ``generate(SpeechRequest)`` -> waveform chunks; ``feed(request_id, codes, finished)``."""

    def generate(self, req: SpeechRequest) -> AsyncIterator[dict]:
        return super().generate(req)

    async def feed(self, request_id: str, codes: list[int], finished: bool) -> None:
        await super().feed(request_id, list(codes), finished)


def remote_backends(handles: dict[str, DeploymentHandle], catalog, health: StageHealth, cache=None,
                    batch: int = 1) -> dict:
    """The runner's backend of each stage the ingress calls (encoder stages: called by AR replicas only)."""
    out: dict = {}
    for k, h in handles.items():
        speech, kind = catalog.speech.get(k), catalog.kinds[k]
        if speech == "talker":
            out[k] = RemoteTalker(h, k, health, catalog.config.stages[k].engine.model.path)
        elif speech == "token2wav":
            out[k] = RemoteToken2Wav(h, k, health)
        elif kind == "ar":
            out[k] = RemoteAR(h, cache, catalog.names[k], batch, k, health)
        elif kind == "dit":
            out[k] = RemoteDiT(h, k, health)
    return out
