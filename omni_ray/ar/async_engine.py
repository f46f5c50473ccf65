"""The asyncio face of the engine, for serving: many callers, one engine loop, one batch.

    engine = AsyncLLM(cfg)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), "req-1"):
        print(out.text, end="")

A background task steps the engine in a worker thread (the event loop never blocks on the
GPU) and hands each request its deltas through its own queue. New requests and aborts are
applied between steps; ``abort`` (or a caller that stops iterating) frees the blocks before the
next step.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from omni_ray.ar.detokenizer import stream_safe_len
from omni_ray.ar.llm_engine import LLMEngine
from omni_ray.ar.sampling_params import EncodeParams, SamplingParams
from omni_ray.ar.sequence import Sequence
from omni_ray.config import AREngineConfig
from omni_ray.errors import EngineError, InvalidRequestError, OmniError

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    text: str                       # new text since the previous output
    token_ids: list[int]            # new tokens since the previous output
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None       # "stop" | "length" | "abort" | None
    num_prompt_tokens: int
    num_output_tokens: int


class _Stream:
    __slots__ = ("queue", "seq", "sent_tokens", "sent_chars")

    def __init__(self, seq: Sequence):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seq = seq
        self.sent_tokens = 0
        self.sent_chars = 0


class AsyncLLM:
    def __init__(self, config: AREngineConfig | str, **kwargs):
        self.engine = LLMEngine(config, **kwargs)
        self.tokenizer = self.engine.tokenizer
        self._streams: dict[str, _Stream] = {}
        self._to_add: list[Sequence] = []
        self._to_abort: list[str] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="omni-ar-step")
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._watching = False

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ------------------------------------------------------------------ public API
    async def generate(self, prompt: str | list[int], params: SamplingParams | None, request_id: str):
        params = params or SamplingParams()
        async for out in self._submit(prompt, params, request_id, stream_text=True):
            yield out

    async def encode(self, prompt: str | list[int], request_id: str, layer: int | None = None) -> torch.Tensor:
        """Prompt hidden states [T, H] (float32, CPU)."""
        async for out in self._submit(prompt, EncodeParams(layer), request_id, stream_text=False):
            return out
        raise EngineError(f"request {request_id} ended without hidden states")

    def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self._to_abort.append(request_id)
            if self._wake:
                self._wake.set()

    def stats(self) -> dict:
        out = self.engine.engine_stats() | {"num_streams": len(self._streams), "healthy": self._error is None}
        describe = getattr(self.engine.runner, "describe", None)      # tensor parallel: the ranks
        if describe is not None:
            out["parallel"] = describe()
        return out

    def check_health(self) -> None:
        if self._error is None:
            try:
                self.engine.check_health()            # tensor parallel: every worker still there?
            except OmniError as err:
                self._fail_all(err)
        if self._error is not None:
            if isinstance(self._error, EngineError):
                raise EngineError(self._error.message)
            raise EngineError(f"AR engine loop died: {self._error!r}")

    async def shutdown(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=True)
        self.engine.shutdown()

    # ------------------------------------------------------------------ plumbing
    async def _submit(self, prompt, params, request_id: str, stream_text: bool):
        self.check_health()
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        seq = self.engine.make_sequence(prompt, params, request_id)   # validates; raises InvalidRequestError
        seq.stream_text = stream_text
        stream = _Stream(seq)
        self._streams[request_id] = stream
        self._to_add.append(seq)
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if isinstance(item, torch.Tensor):
                    finished = True
                    yield item
                    return
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:          # the caller went away (disconnect / cancellation)
                self.abort(request_id)
            else:
                self._streams.pop(request_id, None)

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
            if not self._watching:                    # a worker that dies fails requests at once,
                self._watching = True                 # even while a step is stuck waiting on it
                self.engine.add_failure_callback(lambda err: loop.call_soon_threadsafe(self._fail_all, err))

    def _fail_all(self, err: BaseException) -> None:
        """The engine is broken: every open request gets ``err``; the engine reports unhealthy."""
        if self._error is None:
            self._error = err
        exc = err if isinstance(err, OmniError) else EngineError(f"AR engine failed: {err!r}")
        for stream in self._streams.values():
            stream.queue.put_nowait(exc)
        self._streams.clear()
        self._to_add.clear()
        if self._wake is not None:
            self._wake.set()

    def _apply_pending(self) -> None:
        adds, self._to_add = self._to_add, []
        for seq in adds:
            if seq.request_id in self._streams:
                self.engine.add_sequence(seq)
        aborts, self._to_abort = self._to_abort, []
        for rid in aborts:
            self.engine.abort(rid)
            stream = self._streams.pop(rid, None)
            if stream is not None:
                s = stream.seq
                stream.queue.put_nowait(RequestOutput(rid, "", [], None, True, "abort", s.num_prompt_tokens,
                                                      s.num_output_tokens))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._error is None:
                self._apply_pending()
                if self.engine.is_finished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                changed = await loop.run_in_executor(self._executor, self.engine.step)
                for seq in changed:
                    self._emit(seq)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # the engine is broken: fail everyone, report unhealthy
            log.exception("AR engine loop died")
            self._fail_all(err)

    def _emit(self, seq: Sequence) -> None:
        stream = self._streams.get(seq.request_id)
        if stream is None:
            return
        if seq.is_encode:
            if seq.is_finished:
                stream.queue.put_nowait(torch.cat(seq.hidden_chunks))
            return
        out_ids = seq.output_token_ids
        new_ids = out_ids[stream.sent_tokens:]
        safe = stream_safe_len(seq, seq.params.stop)
        text = seq.output_text[stream.sent_chars:safe]
        if not new_ids and not text and not seq.is_finished:
            return
        lp = seq.logprobs[stream.sent_tokens:] if seq.params.logprobs else None
        stream.sent_tokens = len(out_ids)
        stream.sent_chars = max(stream.sent_chars, safe)
        stream.queue.put_nowait(RequestOutput(seq.request_id, text, new_ids, lp, seq.is_finished,
                                              seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens))
