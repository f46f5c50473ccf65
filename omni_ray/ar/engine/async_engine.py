"""The asyncio face of the engine, for serving: many callers, one engine loop, one batch.

    engine = AsyncLLM(cfg)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), "req-1"):
        print(out.text, end="")

An engine core (``omni_ray/ar/engine/engine_core.py``) owns the engine: in its own process (no GIL
shared with the serving event loop), or, under tensor parallelism, in a thread of this one. It
takes new requests and aborts between steps and hands each step's outputs to the event loop at
once; each caller reads its own stream, where outputs it has not taken yet are merged (a caller slower than the engine
gets one output with everything new, never a backlog of per-step items); ``interval`` paces a
caller to one output per interval tick (the first and the last go at once; callers with the same
interval wake together). ``abort`` (or a caller
that stops iterating) frees the blocks before the next step. Stream text (without stop strings)
is decoded here, from the token ids, when the caller takes an output (the core sends ids only):
a paced caller's text is decoded once per message, not once per engine step.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Callable

import numpy as np
import torch

from omni_ray.ar.engine.detokenizer import StreamText
from omni_ray.ar.engine.engine_core import RequestOutput, make_core
from omni_ray.ar.models.checkpoint import checkpoint_layout
from omni_ray.ar.multimodal import MultiModalProcessor
from omni_ray.ar.sampling_params import EncodeParams, SamplingParams
from omni_ray.config import AREngineConfig
from omni_ray.errors import EngineError, InvalidRequestError, OmniError

__all__ = ["AsyncLLM", "RequestOutput"]
log = logging.getLogger(__name__)


def _merge(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one."""
    lp = None if old.logprobs is None and new.logprobs is None else (old.logprobs or []) + (new.logprobs or [])
    top = None if old.top_logprobs is None and new.top_logprobs is None else \
        (old.top_logprobs or []) + (new.top_logprobs or [])
    hidden = old.hidden_states if new.hidden_states is None else new.hidden_states if old.hidden_states is None \
        else np.concatenate([old.hidden_states, new.hidden_states])      # rows in position order, none dropped
    first = old if old.prompt_positions is not None else new
    return RequestOutput(new.request_id, old.text + new.text, old.token_ids + new.token_ids, lp, new.finished,
                         new.finish_reason, new.num_prompt_tokens, new.num_output_tokens,
                         old.context_ids if old.context_ids is not None else new.context_ids, top,
                         old.prompt_logprobs if old.prompt_logprobs is not None else new.prompt_logprobs,
                         hidden, first.prompt_positions, first.rope_delta)


def _next_tick(now: float, interval: float) -> float:
    """When a paced stream may have its next output: the first multiple of ``interval`` (on the
    loop's clock) at least half an interval away. Streams paced alike wake on the same ticks, in
    one loop turn, so a batched stage call sends all of them in one message; on average one
    output per interval, never two within half of one."""
    if interval <= 0 or interval == math.inf:
        return now + interval
    return math.ceil((now + interval / 2) / interval) * interval


def _last(item) -> bool:
    return not isinstance(item, RequestOutput) or item.finished


class _Stream:
    """One request's output not yet taken by its caller: outputs merge while they wait. While the
    caller waits out its pace, new outputs only merge (no wake-up per engine step)."""

    __slots__ = ("item", "ready", "pacing", "text")

    def __init__(self, text: StreamText | None = None):
        self.item = None
        self.ready = asyncio.Event()
        self.pacing = False
        self.text = text                  # decodes the stream's text from its token ids (no stop strings)

    def put(self, item) -> None:
        cur = self.item
        if isinstance(cur, RequestOutput) and isinstance(item, RequestOutput):
            self.item = _merge(cur, item)
        elif cur is None or not isinstance(cur, BaseException):   # an error stays the last word
            self.item = item
        if not self.pacing or _last(self.item):
            self.ready.set()

    async def take(self, not_before: float, loop: asyncio.AbstractEventLoop):
        """The pending item, once there is one and ``not_before`` (loop time) has passed; a final
        item (finished, error, hidden states) does not wait for ``not_before``."""
        while True:
            item, timer = self.item, None
            if item is not None:
                if _last(item) or loop.time() >= not_before:
                    self.item = None
                    return item
                self.pacing = True
                if not_before != math.inf:
                    timer = loop.call_at(not_before, self.ready.set)
            self.ready.clear()
            try:
                await self.ready.wait()
            finally:
                self.pacing = False
                if timer is not None:
                    timer.cancel()


class AsyncLLM:
    def __init__(self, config: AREngineConfig | str, **kwargs):
        cfg = config if isinstance(config, AREngineConfig) else AREngineConfig.from_kwargs(config, **kwargs)
        self.core = make_core(cfg)
        self.tokenizer = self.core.tokenizer
        # multimodal checkpoints: media are processed by the caller (a stage thread), not the engine loop
        self.layout = getattr(self.core, "layout", None) or checkpoint_layout(cfg.model.path)
        self.mm_processor = MultiModalProcessor.from_pretrained(self.layout, self.tokenizer)
        self._streams: dict[str, _Stream] = {}
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
    async def generate(self, prompt: str | list[int], params: SamplingParams | None, request_id: str,
                       interval: float | Callable[[], float] | None = None):
        """RequestOutputs with the text and tokens new since the previous one. ``interval`` (seconds,
        or a callable giving them): at most one output per interval, the rest merged into it. With
        ``params.return_hidden_states`` each carries ``hidden_states``: the [n, H] float32 CPU rows new since
        the previous one (merged outputs: concatenated), and the first ``prompt_positions`` / ``rope_delta``
        (M-RoPE prompts)."""
        params = params or SamplingParams()
        async for out in self._submit(prompt, params, request_id, stream_text=True, interval=interval):
            yield out

    async def encode(self, prompt: str | list[int], request_id: str, layer: int | None = None,
                     drop_tokens: int = 0) -> torch.Tensor:
        """Prompt hidden states [T, H] (float32, CPU); ``drop_tokens=k``: rows k.. only ([T - k, H]), the
        first k positions served by the prefix cache where it holds them."""
        params = EncodeParams(layer, drop_tokens=drop_tokens)
        async for out in self._submit(prompt, params, request_id, stream_text=False):
            return torch.from_numpy(out)
        raise EngineError(f"request {request_id} ended without hidden states")

    def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self.core.abort(request_id)

    def stats(self) -> dict:
        out = self.core.stats() | {"num_streams": len(self._streams), "healthy": self._error is None}
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
    async def _submit(self, prompt, params, request_id: str, stream_text: bool, interval=None):
        self.check_health()
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:                    # first call, or the caller's loop changed
            self._loop = loop
            self.core.start(loop, self._deliver, self._fail_all)
        pace = interval if callable(interval) else (lambda: interval or 0.0)
        text = None
        if stream_text and isinstance(params, SamplingParams) and not params.stop:
            text = StreamText(self.tokenizer, params.skip_special_tokens)      # the engine core sends ids only
        stream = self._streams[request_id] = _Stream(text)
        self.core.add(request_id, prompt, params, stream_text)
        finished, not_before = False, 0.0
        try:
            while True:
                item = await stream.take(not_before, loop)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = _last(item)
                if stream.text is not None and isinstance(item, RequestOutput):
                    # decoded as the caller takes it: once per message, not once per engine step
                    item.text = stream.text.feed(item.context_ids, item.token_ids, final=finished)
                if isinstance(item, RequestOutput) and item.hidden_states is not None:
                    item.hidden_states = torch.from_numpy(item.hidden_states)        # no copy
                if isinstance(item, RequestOutput) and item.prompt_positions is not None:
                    item.prompt_positions = torch.from_numpy(item.prompt_positions)
                yield item
                if finished:
                    return
                not_before = _next_tick(loop.time(), pace())
        finally:
            if self._streams.get(request_id) is stream:
                if not finished:          # the caller went away (disconnect / cancellation)
                    self.core.abort(request_id)
                del self._streams[request_id]

    def _deliver(self, items: list) -> None:
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put(item)

    def _fail_all(self, err: BaseException) -> None:
        """The engine is broken: every open request gets ``err``; the engine reports unhealthy."""
        if self._error is None:
            self._error = err
        exc = err if isinstance(err, OmniError) else EngineError(f"AR engine failed: {err!r}")
        for stream in self._streams.values():
            stream.put(exc)
        self._streams.clear()
