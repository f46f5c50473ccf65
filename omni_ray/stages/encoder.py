"""The encoder stage engine: the media towers of a multimodal checkpoint on their own (vLLM's encode /
prefill / decode split), so encoder replicas scale apart from the decoder.

    eng = EncoderStageEngine(encoder_engine_cfg); eng.start()
    embeddings = await eng.encode(items)        # MediaItems -> [item.length, hidden] each, on the CPU

Calls that arrive within ``batch_wait_s`` of each other (up to ``max_batch_tokens`` rows) share one
tower call per kind, run in a worker thread off the event loop; equal content in a batch or in the
cache (``cache_tokens`` rows, by content hash) is encoded once. An AR stage whose ``encoder`` names
this stage gets the items' embeddings from here (``attach_embeddings``) and its engine loads no towers.
A batch that fails is run again call by call, so a bad item fails its own request only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import torch

from omni_ray.ar.multimodal import MediaItem, MultiModalInputs
from omni_ray.config import EncoderEngineConfig
from omni_ray.errors import EngineError, OmniError

log = logging.getLogger(__name__)

Encode = Callable[[list[MediaItem]], Awaitable[list[torch.Tensor]]]


async def attach_embeddings(mm: MultiModalInputs, encode: Encode) -> MultiModalInputs:
    """``mm`` with each media item's embedding from ``encode`` (an encoder stage) and its encoder inputs
    dropped (what an engine without towers takes)."""
    if not mm.items:
        return mm
    embeddings = await encode(mm.items)
    if len(embeddings) != len(mm.items):
        raise EngineError(f"the encoder stage answered {len(embeddings)} embeddings for {len(mm.items)} items")
    items = [it.without_inputs(e) for it, e in zip(mm.items, embeddings)]
    return MultiModalInputs(mm.token_ids, items, mm.positions, mm.rope_delta)


class EncoderStageEngine:
    """``encode(items)`` over ``MediaEncoders`` with the towers loaded, batching concurrent calls."""

    kind = "encoder"

    def __init__(self, config: EncoderEngineConfig):
        self.config = config
        self.encoders = None
        self._queue: list[tuple[list[MediaItem], asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._closed = False
        self.batches = self.calls = 0

    def start(self) -> None:
        if self.encoders is not None:
            return
        from omni_ray.ar.models.checkpoint import checkpoint_layout
        from omni_ray.ar.models.loader import read_hf_config
        from omni_ray.ar.models.mrope import MRopeSpec
        from omni_ray.ar.multimodal.encoders import MediaEncoders
        from omni_ray.devices import resolve_device, resolve_dtype
        from omni_ray.errors import ConfigError

        path = checkpoint_layout(self.config.model.path).weights
        if MRopeSpec.from_hf(read_hf_config(path)) is None:
            raise ConfigError(f"{self.config.model.path}: not a multimodal checkpoint (no media encoders to run)")
        device = resolve_device(self.config.device)
        self.encoders = MediaEncoders(path, device, resolve_dtype(self.config.model.dtype, device),
                                      self.config.cache_tokens)

    @property
    def model_name(self) -> str:
        return self.config.model.served_name

    async def encode(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """The encoder outputs of ``items`` ([item.length, hidden] each, CPU), batched with other calls."""
        if self._closed:
            raise EngineError("the encoder stage is shut down")
        if not items:
            return []
        self.calls += 1
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((list(items), fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self._queue:
            await asyncio.sleep(self.config.batch_wait_s)
            batch, rows = [], 0
            while self._queue and (not batch or rows + sum(it.length for it in self._queue[0][0])
                                   <= self.config.max_batch_tokens):
                call = self._queue.pop(0)
                batch.append(call)
                rows += sum(it.length for it in call[0])
            await self._encode_batch(batch)

    async def _encode_batch(self, batch: list[tuple[list[MediaItem], asyncio.Future]]) -> None:
        live = [(items, fut) for items, fut in batch if not fut.done()]     # a caller that left: skipped
        if not live:
            return
        self.batches += 1
        try:
            outs = await asyncio.to_thread(self.encoders.outputs, [it for items, _ in live for it in items])
        except Exception as err:  # noqa: BLE001 - run the calls alone: only the bad one fails
            if len(live) == 1:
                _fail(live[0][1], err)
                return
            for call in live:
                await self._encode_batch([call])
            return
        i = 0
        for items, fut in live:
            if not fut.done():
                fut.set_result(outs[i:i + len(items)])
            i += len(items)

    def abort(self, request_id: str) -> None:
        """Nothing runs per request here (a call that left is skipped when its batch runs)."""

    def check_health(self) -> None:
        if self._closed or self.encoders is None:
            raise EngineError("the encoder stage is not running")

    def stats(self) -> dict:
        enc = self.encoders
        return {"calls": self.calls, "batches": self.batches, "queued_calls": len(self._queue),
                "encoded_items": enc.encoded_items if enc else 0,
                "cache_hits": enc.cache.hits if enc else 0, "cache_misses": enc.cache.misses if enc else 0,
                "cache_rows": enc.cache.rows if enc else 0}

    async def shutdown(self) -> None:
        self._closed = True
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(EngineError("the encoder stage shut down"))
        self._queue.clear()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        self.encoders = None


def _fail(fut: asyncio.Future, err: Exception) -> None:
    if fut.done():
        return
    if not isinstance(err, OmniError):
        log.error("encoder batch failed: %r", err)
        err = EngineError(f"encoder stage failed: {err!r}")
    fut.set_exception(err)
