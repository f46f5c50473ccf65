"""The AR stage deployment: one ``AsyncLLM`` per replica, its loop shared by every request the
replica serves (continuous batching across HTTP requests).

    handle.options(stream=True).generate.remote(req)   -> dict deltas (text, token_ids, ...)
    await handle.complete.remote(req)                  -> the same deltas merged into one
    await handle.encode.remote(req)                    -> Handoff(ref=ObjectRef, shape=[T, H], ...)
    await handle.encode_batch.remote([req, neg])       -> [Handoff, Handoff] (one engine step)
    handle.options(stream=True).generate_batch.remote([req, ...], unary=[i, ...], sent_at=t)
        -> lists of (index, delta) (the requests at ``unary`` are paced like ``complete``)
    await handle.abort.remote([request_id], replica=id)            -> aborts in a batched call

``req`` is an ``omni_ray.stages.ARRequest``; the replica is a thin shim over the stage engine
(``omni_ray.stages.ar.ARStageEngine``). Beside it here: the call batching
(``generate_batch``, whose sender is deployments/ingress/call_batcher.py), stream pacing, the pins
of handed-out hidden states and the profiling probes (deployments/stages/probes.py).

A client error (a 4xx, e.g. a prompt over the token limit) comes back as a value: the last item
of a stream, the result of ``complete`` / ``encode`` (deployments/stages/replica.py says why).

With ``encoder`` (the handle of an encoder stage, ``stages.<key>.encoder``) the replica sends a
request's images and audio there and gives its engine (which loads no towers) the embeddings.

``encode`` puts the hidden states in the object store and returns a Handoff holding the reference,
so neither Serve nor the ingress resolves it; the DiT replica that receives it does. So do the
deltas of a request with ``params.return_hidden_states`` (a thinker's rows for its talker): each
delta's ``hidden_states`` is a Handoff of its own rows (pinned as encode's), ``complete`` one joined
Handoff (``Handoff.refs``: the rows' references in order).
A caller that goes away (client disconnect, ``cancel()``) raises CancelledError here, which
ends the engine generator, which aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from typing import Any, AsyncIterator

import ray
from ray import serve

from deployments.services import CapacityReporter, replica_id
from deployments.stages.batch import fan_in
from deployments.stages.encoder import remote_encoder
from deployments.stages.pins import Pins
from deployments.stages.probes import CallLog
from deployments.stages.replica import StageReplica, error_as_value, errors_as_values
from deployments.streams import OpenStreams
from omni_ray.config import ARStageConfig, LimitsConfig, MediaConfig, validate
from omni_ray.errors import EngineError, OmniError
from omni_ray.stages.ar import ARStageEngine, merge_deltas, pretokenize
from omni_ray.stages.requests import ARRequest, Handoff, ImageInput

log = logging.getLogger("ray.serve")


async def resolve_images(req: ARRequest) -> ARRequest:
    """``req`` with its ``ImageInput``s (an edit's input image: the ref of the bytes the ingress put
    once in the object store for both stages) resolved into those bytes, which the engine decodes
    under app.media as any image; other requests unchanged."""
    mm = req.multi_modal_data
    if not mm or not any(isinstance(v, ImageInput) for v in mm.values()):
        return req
    out = {}
    for k, v in mm.items():
        out[k] = (v.image if v.image is not None else await v.ref) if isinstance(v, ImageInput) else v
    return dataclasses.replace(req, multi_modal_data=out)


def _stage_error(e: Exception) -> OmniError:
    return e if isinstance(e, OmniError) else EngineError(f"AR stage failed: {e!r}")


@serve.deployment
class ARDeployment(StageReplica):
    def __init__(self, stage: str, config: dict, limits: dict | None = None, services: dict | None = None,
                 media: dict | None = None, encoder=None):
        self.stage, self.replica = stage, replica_id()
        self.config: ARStageConfig = validate(ARStageConfig, config)
        self.limits: LimitsConfig = validate(LimitsConfig, limits or {})
        # ``encoder``: the handle of the encoder stage that runs this model's towers (stages.<key>.encoder)
        self.engine = ARStageEngine(self.config.engine_config(), self.limits, media=validate(MediaConfig, media or {}),
                                    encoder=remote_encoder(encoder) if encoder is not None else None)
        self.engine.start()
        self.pins = Pins()
        self.streams = OpenStreams(self.config.streaming)
        self.call_log = CallLog.open(self.config.engine.step_log)   # batched calls, beside the engine's steps
        capacity = min(self.config.deployment.max_ongoing_requests, self.config.engine.scheduler.max_num_seqs)
        self.capacity = CapacityReporter(services, stage, capacity)
        self.start_metrics(services, self.engine.model_name)
        log.info("AR stage %r ready: model %s", stage, self.engine.model_name)

    async def generate(self, req: ARRequest) -> AsyncIterator[dict]:
        """Deltas paced by the engine itself (one Serve message per interval, what came meanwhile
        merged before it reaches Python here): a busy replica's cost grows with its messages, not
        with engine steps x streams."""
        with self.streams.open():
            deltas = self.engine.generate(req, interval=self.streams.interval)
            async for delta in errors_as_values(self.metrics.stream(deltas, req.request_id)):
                yield self._put_rows(delta)

    async def generate_batch(self, reqs: list[ARRequest], unary: list[int] | None = None,
                             sent_at: float | None = None) -> AsyncIterator[list[tuple[int, Any]]]:
        """Several streams in one Serve call (the ingress sends requests that arrive together this
        way: Serve's per-call cost, ~1 ms of router and replica work, is paid once), fanned in by
        ``deployments.stages.batch.fan_in``: lists of (index, delta | OmniError | None). The
        requests at the indices in ``unary`` are paced like ``complete``; ``sent_at`` (the sender's
        clock) goes to the call log. Closing the call aborts every request in it."""
        if self.call_log is not None:      # profiling (engine.step_log): when this call got here
            self.call_log.call(len(reqs), sent_at)
        if len(reqs) > 1:          # one batch encode, off the event loop (the Rust tokenizer drops the GIL)
            reqs = await asyncio.get_running_loop().run_in_executor(None, pretokenize, self.engine.tokenizer, reqs)
        paced = set(unary or ())
        streams = [self._complete_deltas(r) if i in paced else self.generate(r) for i, r in enumerate(reqs)]
        calls = fan_in(streams, self.replica, _stage_error)
        try:
            async for items in calls:
                yield items
        finally:
            await calls.aclose()                      # -> each engine stream aborts its request

    def abort(self, request_ids: list[str], replica: str | None = None) -> None:
        """Abort requests of a batched call (``replica``: routes this call to where they run)."""
        for rid in request_ids:
            self.engine.abort(rid)

    async def complete(self, req: ARRequest) -> dict | OmniError:
        """The whole generation as one delta (non-streaming callers: one message, not one per token)."""
        return await error_as_value(self._complete(req))

    async def _complete(self, req: ARRequest) -> dict:
        return self._put_rows(merge_deltas([d async for d in self._engine_deltas(req)]))   # one put for all rows

    async def _complete_deltas(self, req: ARRequest) -> AsyncIterator[dict]:
        """A non-streaming request's deltas: the engine hands over the first output (time to first
        token) and then the rest at the end; the last carries ``replica_s`` (Server-Timing "engine")."""
        async with contextlib.aclosing(self._engine_deltas(req)) as deltas:    # closed with us: aborts
            async for d in deltas:
                yield self._put_rows(d)

    async def _engine_deltas(self, req: ARRequest) -> AsyncIterator[dict]:
        t0 = time.perf_counter()
        deltas = self.engine.generate(req, interval=math.inf)
        async for d in self.metrics.stream(deltas, req.request_id):
            if d["finished"]:
                d["replica_s"] = time.perf_counter() - t0
            yield d

    async def thinker_prompt(self, req: ARRequest) -> tuple[list[int], Any, int] | OmniError:
        """(prompt token ids, M-RoPE positions [3, L] or None, rope delta) of ``req`` as the engine processes
        it: what a speech request's talker prompt needs beside the thinker's streamed hidden states."""
        return await error_as_value(self._thinker_prompt(req))

    async def _thinker_prompt(self, req: ARRequest) -> tuple[list[int], Any, int]:
        from omni_ray.ar.multimodal import MultiModalInputs

        prompt = await self.engine.prompt(await resolve_images(req))
        if isinstance(prompt, MultiModalInputs):
            return list(prompt.token_ids), prompt.positions, prompt.rope_delta
        return list(prompt), None, 0

    def _put_rows(self, delta):
        """A delta's hidden-state rows (``return_hidden_states``) into the object store: the delta goes on with
        a Handoff of their reference, pinned until the next stage has read them; other items unchanged."""
        hs = delta.get("hidden_states") if isinstance(delta, dict) else None
        if hs is None:
            return delta
        ref = ray.put(hs.numpy())
        self.pins.hold(ref, hs.numel() * hs.element_size())
        delta["hidden_states"] = Handoff(shape=list(hs.shape), ref=ref, dtype=str(hs.dtype).replace("torch.", ""),
                                         object_id=ref.hex())
        return delta

    async def encode(self, req: ARRequest) -> Handoff | OmniError:
        return await error_as_value(self._encode(req))

    async def encode_batch(self, reqs: list[ARRequest]) -> list[Handoff] | OmniError:
        """``encode`` of several requests in one call (a prompt and its negative prompt): added to the
        engine together, so they run in one step."""
        return await error_as_value(self._encode_batch(reqs))

    async def _encode_batch(self, reqs: list[ARRequest]) -> list[Handoff]:
        return list(await asyncio.gather(*(self._encode(r) for r in reqs)))

    async def _encode(self, req: ARRequest) -> Handoff:
        with self.metrics.track(req.request_id, "encode"):
            hs = await self.engine.encode(await resolve_images(req))    # [T, H] float32 CPU
        ref = ray.put(hs.numpy())
        self.pins.hold(ref, hs.numel() * hs.element_size())   # until the next stage has it (deployments/stages/pins.py)
        # what the hidden states are a function of: lets the DiT cache key images conditioned on them
        # (``req`` as it came: an input image by its digest)
        source = {"model": self.engine.model_name,
                  "input": hashlib.sha256(req.input_digest().encode()).hexdigest()[:32]}
        return Handoff(shape=list(hs.shape), ref=ref, dtype=str(hs.dtype).replace("torch.", ""),
                       object_id=ref.hex(), source=source)

    async def shutdown(self) -> None:
        if getattr(self, "call_log", None) is not None:
            self.call_log.close()
        await super().shutdown()

    def info(self) -> dict:
        return {"stage": self.stage, "kind": "ar", "model": self.engine.model_name,
                "path": self.config.engine.model.path, "max_model_len": self.engine.max_model_len,
                "device": self.config.engine.device}
