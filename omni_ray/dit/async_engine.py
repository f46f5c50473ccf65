"""The asyncio face of the DiT engine, for serving: many callers, one loop, shared batches.

    engine = AsyncDiTEngine(DiTEngineConfig(model=ModelConfig(path="tiny:pixart")))
    async for ev in engine.generate("a red fox", DiffusionParams(seed=0), "req-1"):
        if ev.kind == "progress": print(ev.step, "/", ev.total)
        else: images = ev.images

One asyncio task drives the engine; each ``step()`` (GPU work) runs in a single worker thread so
the event loop never blocks. New requests join between steps. ``abort`` ends the caller's
generator at once with ``RequestCancelledError`` and frees the request's slot at once (the
engine's bookkeeping is thread-safe and never waits on GPU work); a step in flight finishes
without it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import torch

from omni_ray.config import DiTEngineConfig
from omni_ray.devices import green_stream, own_stream
from omni_ray.dit.engine import DiTEngine
from omni_ray.dit.params import DiffusionParams, DiTEvent
from omni_ray.dit.request import DiTRequest
from omni_ray.errors import EngineError, InvalidRequestError, OmniError, RequestCancelledError

log = logging.getLogger(__name__)


CONSUMER_TURNS = 16       # event-loop turns a finished request's consumer gets before the next step is queued


async def _let_consumers_run() -> None:
    """A few event-loop turns for the callers of requests that just finished: what they do next with the
    result on the worker thread (``run_between_steps``: a speech window's vocoder) is queued before the next
    step, instead of waiting behind it (a whole token2wav ODE, or a denoising step). The hand-off from the
    step's event to such a call takes a handful of turns (queue, the caller's task, its batcher's task);
    each turn with nothing to run costs microseconds."""
    for _ in range(CONSUMER_TURNS):
        await asyncio.sleep(0)


class AsyncDiTEngine:
    def __init__(self, config: DiTEngineConfig | str, **kwargs):
        self.engine = DiTEngine(config, **kwargs)
        self._queues: dict[str, asyncio.Queue] = {}
        self._to_add: list[DiTRequest] = []          # applied by the loop between steps
        cfg, device = self.engine.config, self.engine.device
        stream = cfg.cuda_stream and device.type == "cuda"
        high = cfg.cuda_stream_priority == "high"
        # cuda_stream_sms: a green context's stream; the graphs the worker captures are captured on it (record_graph)
        green = green_stream(device, cfg.cuda_stream_sms, cfg.cuda_stream_sms_side, high) if (
            stream and cfg.cuda_stream_sms) else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="omni-dit-step",       # its steps, on its stream
                                            initializer=own_stream if stream else None,
                                            initargs=(device, high, green))
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def config(self) -> DiTEngineConfig:
        return self.engine.config

    # ------------------------------------------------------------------ public API
    async def generate(self, prompt: str | None, params: DiffusionParams, request_id: str,
                       prompt_embeds: torch.Tensor | None = None,
                       prompt_mask: torch.Tensor | None = None,
                       negative_prompt_embeds: torch.Tensor | None = None,
                       negative_prompt_mask: torch.Tensor | None = None,
                       image=None, speech=None, output_type: str = "pil") -> AsyncIterator[DiTEvent]:
        """Yields ``DiTEvent("progress", step, total)`` per denoising step, then
        ``DiTEvent("done", images=[PIL.Image, ...])``. Bad parameters raise InvalidRequestError
        before any work; ``abort(request_id)`` ends it with RequestCancelledError.
        ``negative_prompt_embeds`` / ``negative_prompt_mask``: the negative's conditioning (the AR
        stage's hidden states of it); ``image``: an edit model's input image (PIL); ``speech``: a speech
        model's ``SpeechInput`` (``done`` then carries ``[waveform]``, or ``[mel]`` with ``output_type="latent"``)."""
        self.check_health()
        if self._closed:
            raise EngineError("the DiT engine is shut down")
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        req = self.engine.make_request(prompt, params, request_id, prompt_embeds, prompt_mask, output_type,
                                       negative_prompt_embeds=negative_prompt_embeds,
                                       negative_prompt_mask=negative_prompt_mask, image=image, speech=speech)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._to_add.append(req)
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.kind == "done":
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:          # the caller went away (disconnect / cancellation)
                self.abort(request_id)
            self._queues.pop(request_id, None)

    async def encode_prompt(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``DiTEngine.encode_prompt`` on the engine's worker thread (between steps): (embeds
        [B, T, H], mask [B, T]) on the CPU, to cache and pass back as prompt_embeds / prompt_mask."""
        self.check_health()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.encode_prompt, prompts)

    def run_on_worker(self, fn, *args):
        """``fn(*args)`` on the engine's worker thread, waited for: set-up work that must run on the engine's stream
        (graph captures at stage start: on a green context's stream they run on its SMs only)."""
        return self._executor.submit(fn, *args).result()

    async def run_between_steps(self, fn, *args):
        """``fn(*args)`` on the engine's worker thread, between steps: device work outside the engine's
        requests (a speech stream's vocoder: ``SpeechStream.audio``) that never overlaps a step."""
        self.check_health()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def abort(self, request_id: str) -> None:
        """End the request now: its caller gets RequestCancelledError and its slot is free for
        the next step (a step in flight finishes without it)."""
        queue = self._queues.pop(request_id, None)
        if queue is None:
            return
        queue.put_nowait(RequestCancelledError(f"request {request_id} was cancelled"))
        self._to_add = [r for r in self._to_add if r.request_id != request_id]
        self.engine.abort(request_id)                  # thread-safe; never waits on GPU work

    def stats(self) -> dict:
        return self.engine.engine_stats() | {
            "waiting_requests": len(self.engine.batcher.waiting) + len(self._to_add),
            "num_streams": len(self._queues), "healthy": self._error is None}

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineError(f"DiT engine loop died: {self._error!r}")
        self.engine.check_health()                     # parallel worker ranks

    async def shutdown(self) -> None:
        self._closed = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for queue in self._queues.values():
            queue.put_nowait(EngineError("the DiT engine shut down"))
        self._queues.clear()
        self._executor.shutdown(wait=True)
        self.engine.shutdown()

    # ------------------------------------------------------------------ plumbing
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _apply_pending(self) -> None:
        adds, self._to_add = self._to_add, []
        for req in adds:
            if req.request_id in self._queues:
                self.engine.add(req)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                events = await loop.run_in_executor(self._executor, self.engine.step)
                steps = Counter(req for req, kind in events if kind == "progress")     # several: a whole ODE
                for req, kind in events:
                    step = req.step_idx - steps[req] + 1
                    if kind == "progress":
                        steps[req] -= 1
                    self._emit(req, kind, step)
                if any(kind == "done" for _, kind in events):
                    await _let_consumers_run()
        except asyncio.CancelledError:
            raise
        except BaseException as err:   # the engine is broken: fail everyone, report unhealthy
            log.exception("DiT engine loop died")
            self._error = err
            exc = err if isinstance(err, OmniError) else EngineError(f"DiT engine failed: {err!r}")
            for queue in self._queues.values():
                queue.put_nowait(exc)
            self._queues.clear()

    def _emit(self, req: DiTRequest, kind: str, step: int) -> None:
        queue = self._queues.get(req.request_id)
        if queue is None:
            return
        if kind == "progress":
            queue.put_nowait(DiTEvent("progress", step=step, total=req.total_steps,
                                      request_id=req.request_id))
        else:
            queue.put_nowait(DiTEvent("done", step=req.total_steps, total=req.total_steps, images=req.images,
                                      request_id=req.request_id, stats=req.summary()))
