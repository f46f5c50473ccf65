"""The asyncio face of the engine, for serving: many callers, one engine loop, one batch.

    engine = AsyncLLM(cfg)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), "req-1"):
        print(out.text, end="")

An engine core (``omni_ray/ar/engine_core.py``) owns the engine: in its own process on CUDA (no
GIL shared with the serving event loop), else in a thread of this one. It takes new requests and
aborts between steps and hands each step's outputs to the event loop at once; each caller reads
its own queue. ``abort`` (or a caller that stops iterating) frees the blocks before the next step.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import torch

from omni_ray.ar.engine_core import RequestOutput, make_core
from omni_ray.ar.sampling_params import EncodeParams, SamplingParams
from omni_ray.config import AREngineConfig
from omni_ray.errors import EngineError, InvalidRequestError, OmniError

__all__ = ["AsyncLLM", "RequestOutput"]
log = logging.getLogger(__name__)


class AsyncLLM:
    def __init__(self, config: AREngineConfig | str, **kwargs):
        cfg = config if isinstance(config, AREngineConfig) else AREngineConfig.from_kwargs(config, **kwargs)
        self.core = make_core(cfg)
        self.tokenizer = self.core.tokenizer
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None

    @property
    def engine(self):
        """The in-process ``LLMEngine`` (thread core only)."""
        return getattr(self.core, "engine", None)

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    # ------------------------------------------------------------------ public API
    async def generate(self, prompt: str | list[int], params: SamplingParams | None, request_id: str):
        params = params or SamplingParams()
        async for out in self._submit(prompt, params, request_id, stream_text=True):
            yield out

    async def encode(self, prompt: str | list[int], request_id: str, layer: int | None = None) -> torch.Tensor:
        """Prompt hidden states [T, H] (float32, CPU)."""
        async for out in self._submit(prompt, EncodeParams(layer), request_id, stream_text=False):
            return torch.from_numpy(out)
        raise EngineError(f"request {request_id} ended without hidden states")

    def abort(self, request_id: str) -> None:
        if request_id in self._queues:
            self.core.abort(request_id)

    def stats(self) -> dict:
        out = self.core.stats() | {"num_streams": len(self._queues), "healthy": self._error is None}
        described = self.core.describe()
        if described is not None:
            out["parallel" if self.engine is not None else "core_process"] = described
        return out

    def check_health(self) -> None:
        if self._error is None:
            try:
                self.core.check_health()              # tensor parallel: every worker still there?
            except OmniError as err:
                self._fail_all(err)
        if self._error is not None:
            if isinstance(self._error, EngineError):
                raise EngineError(self._error.message)
            raise EngineError(f"AR engine loop died: {self._error!r}")

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.core.shutdown)

    # ------------------------------------------------------------------ plumbing
    async def _submit(self, prompt, params, request_id: str, stream_text: bool):
        self.check_health()
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:                    # first call, or the caller's loop changed
            self._loop = loop
            self.core.start(loop, self._deliver, self._fail_all)
        queue = self._queues[request_id] = asyncio.Queue()
        self.core.add(request_id, prompt, params, stream_text)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if isinstance(item, np.ndarray):      # an encode request's hidden states
                    finished = True
                    yield item
                    return
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._queues.get(request_id) is queue:
                if not finished:          # the caller went away (disconnect / cancellation)
                    self.core.abort(request_id)
                del self._queues[request_id]

    def _deliver(self, items: list) -> None:
        for rid, item in items:
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(item)

    def _fail_all(self, err: BaseException) -> None:
        """The engine is broken: every open request gets ``err``; the engine reports unhealthy."""
        if self._error is None:
            self._error = err
        exc = err if isinstance(err, OmniError) else EngineError(f"AR engine failed: {err!r}")
        for queue in self._queues.values():
            queue.put_nowait(exc)
        self._queues.clear()
