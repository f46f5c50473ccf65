"""The AR stage deployment: one ``AsyncLLM`` per replica, its loop shared by every request the
replica serves (continuous batching across HTTP requests).

    handle.options(stream=True).generate.remote(req)   -> dict deltas (text, token_ids, ...)
    await handle.complete.remote(req)                  -> the same deltas merged into one
    await handle.encode.remote(req)                    -> {"ref": [ObjectRef], "shape": [T, H], ...}
    handle.options(stream=True).generate_batch.remote([req, ...])  -> lists of (index, delta)
        (a request with "unary": True is paced like ``complete``: first output, then the rest)
    await handle.abort.remote([request_id], replica=id)            -> aborts in a batched call

``generate_batch`` carries the streams that reach an ingress replica together (deployments/ingress/call_batcher.py).

``encode`` puts the hidden states in the object store and returns the reference wrapped in a
list, so neither Serve nor the ingress resolves it; the DiT replica that receives it does.
A caller that goes away (client disconnect, ``cancel()``) raises CancelledError here, which
ends the engine generator, which aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from typing import Any, AsyncIterator

import ray
from ray import serve

from deployments.services import CapacityReporter, replica_id
from deployments.stages.pins import Pins
from deployments.stages.replica import StageReplica
from deployments.streams import OpenStreams
from omni_ray.cluster.dit_cache import hidden_states_input
from omni_ray.config import ARStageConfig, LimitsConfig, validate
from omni_ray.errors import EngineError, OmniError
from omni_ray.pipeline import ar_encode, ar_generate, merge_deltas, pretokenize
from omni_ray.profiling import LoopLag

log = logging.getLogger("ray.serve")

@serve.deployment
class ARDeployment(StageReplica):
    def __init__(self, stage: str, config: dict, limits: dict | None = None, services: dict | None = None):
        from omni_ray.ar import AsyncLLM

        self.stage, self.replica = stage, replica_id()
        self.config: ARStageConfig = validate(ARStageConfig, config)
        self.limits: LimitsConfig = validate(LimitsConfig, limits or {})
        self.engine = AsyncLLM(self.config.engine)
        self.pins = Pins()
        self.streams = OpenStreams(self.config.streaming)
        log_path = self.config.engine.step_log       # batched calls are logged beside the engine's steps
        self.call_log = open(log_path, "a", buffering=1) if log_path else None   # noqa: SIM115
        self.loop_lag = None                         # with the call log: this replica's event-loop lag
        capacity = min(self.config.deployment.max_ongoing_requests, self.config.engine.scheduler.max_num_seqs)
        self.capacity = CapacityReporter(services, stage, capacity)
        self.start_metrics(services, self.engine.model_name)
        log.info("AR stage %r ready: model %s", stage, self.engine.model_name)

    async def generate(self, req: dict) -> AsyncIterator[dict]:
        """Deltas paced by the engine itself (one Serve message per interval, what came meanwhile
        merged before it reaches Python here): a busy replica's cost grows with its messages, not
        with engine steps x streams."""
        with self.streams.open():
            deltas = ar_generate(self.engine, req, self.limits, interval=self.streams.interval)
            async for delta in self.metrics.stream(deltas, req.get("request_id")):
                yield delta

    async def generate_batch(self, reqs: list[dict]) -> AsyncIterator[list[tuple[int, Any]]]:
        """Several streams in one Serve call (the ingress sends requests that arrive together this
        way: Serve's per-call cost, ~1 ms of router and replica work, is paid once). Yields lists of
        (index, delta), (index, OmniError) when one request fails (the others go on), (index, None)
        when one ends; the first message starts with ``(-1, {"replica": id})``, for ``abort``.
        Closing the call aborts every request in it."""
        if self.call_log is not None:      # profiling (engine.step_log): when this call got here
            if self.loop_lag is None:
                self.loop_lag = LoopLag(lambda line: self.call_log.write(json.dumps(line) + "\n"))
                self.loop_lag.start()
            sent = [r["sent_at"] for r in reqs if "sent_at" in r]
            self.call_log.write(json.dumps({"t": round(time.time(), 6), "call": len(reqs),
                                            "sent": round(min(sent), 6) if sent else None}) + "\n")
        queue: asyncio.Queue = asyncio.Queue()

        async def one(i: int, req: dict) -> None:
            try:
                async for d in (self._complete_deltas(req) if req.get("unary") else self.generate(req)):
                    queue.put_nowait((i, d))
            except Exception as e:  # noqa: BLE001 - this request's error, for its caller only
                queue.put_nowait((i, e if isinstance(e, OmniError) else EngineError(f"AR stage failed: {e!r}")))
            queue.put_nowait((i, None))

        if len(reqs) > 1:          # one batch encode, off the event loop (the Rust tokenizer drops the GIL)
            reqs = await asyncio.get_running_loop().run_in_executor(None, pretokenize, self.engine.tokenizer, reqs)
        tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(reqs)]
        live = len(tasks)
        head = [(-1, {"replica": self.replica})]     # rides with the first deltas: no message of its own
        try:
            while live:
                items = head + [await queue.get()]   # the engine wakes every stream in one turn: one message
                head = []
                while not queue.empty():
                    items.append(queue.get_nowait())
                live -= sum(d is None for _, d in items)
                yield items
        finally:
            for t in tasks:
                t.cancel()                            # -> each engine stream aborts its request
            await asyncio.gather(*tasks, return_exceptions=True)

    def abort(self, request_ids: list[str], replica: str | None = None) -> None:
        """Abort requests of a batched call (``replica``: routes this call to where they run)."""
        for rid in request_ids:
            self.engine.abort(rid)

    async def complete(self, req: dict) -> dict:
        """The whole generation as one delta (non-streaming callers: one message, not one per token)."""
        return merge_deltas([d async for d in self._complete_deltas(req)])

    async def _complete_deltas(self, req: dict) -> AsyncIterator[dict]:
        """A non-streaming request's deltas: the engine hands over the first output (time to first
        token) and then the rest at the end; the last carries ``replica_s`` (Server-Timing "engine")."""
        t0 = time.perf_counter()
        deltas = ar_generate(self.engine, req, self.limits, interval=math.inf)
        async for d in self.metrics.stream(deltas, req.get("request_id")):
            if d["finished"]:
                d["replica_s"] = time.perf_counter() - t0
            yield d

    async def encode(self, req: dict) -> dict:
        with self.metrics.track(req.get("request_id"), "encode"):
            hs = await ar_encode(self.engine, req, self.limits)    # [T, H] float32 CPU
        ref = ray.put(hs.numpy())
        self.pins.hold(ref, hs.numel() * hs.element_size())   # until the next stage has it (deployments/stages/pins.py)
        # what the hidden states are a function of: lets the DiT cache key images conditioned on them
        what = hidden_states_input(req)
        source = {"model": self.engine.model_name, "input": hashlib.sha256(what.encode()).hexdigest()[:32]}
        return {"ref": [ref], "shape": list(hs.shape), "dtype": str(hs.dtype).replace("torch.", ""),
                "object_id": ref.hex(), "source": source}

    async def shutdown(self) -> None:
        if getattr(self, "loop_lag", None) is not None:
            self.loop_lag.stop()
        if getattr(self, "call_log", None) is not None:
            self.call_log.close()
        await super().shutdown()

    def info(self) -> dict:
        return {"stage": self.stage, "kind": "ar", "model": self.engine.model_name,
                "path": self.config.engine.model.path, "max_model_len": self.engine.max_model_len,
                "device": self.config.engine.device}
