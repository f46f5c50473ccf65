"""The DiT stage deployment: one ``AsyncDiTEngine`` per replica, requests batched by its loop.

    handle.options(stream=True).generate.remote(req)
        -> {"kind": "progress", "step", "total"} ... {"kind": "done", "images": [PNG bytes], "info"}

``req`` is an ``omni_ray.stages.DiTRequest``; the replica is a thin shim over the stage engine
(``omni_ray.stages.dit.DiTStageEngine``). ``req.conditioning`` is an AR stage's Handoff (an
ObjectRef, its shape and source): this replica is the first place the hidden-state tensor is
materialised (from the object store, zero-copy on one node). Images leave the replica as PNG bytes.

With ``dit_cache.enabled`` the replica consults the application's DiT cache:
  * images of a deterministic request (it has a seed): a hit skips the engine entirely;
  * text-encoder conditioning of a prompt: a hit skips the text encoder (``prompt_embeds``).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from typing import AsyncIterator

import numpy as np
import torch
from ray import serve

from deployments.services import CapacityReporter, dit_cache
from deployments.stages.replica import StageReplica, errors_as_values
from omni_ray.config import DiTStageConfig, validate
from omni_ray.errors import InvalidRequestError
from omni_ray.stages.dit import DiTStageEngine
from omni_ray.stages.requests import DiTRequest, Handoff

log = logging.getLogger("ray.serve")


def to_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def fetch_hidden(hidden: Handoff) -> torch.Tensor:
    """Resolve a handoff's ObjectRef into a [T, H] tensor."""
    if hidden.ref is None:
        raise InvalidRequestError("hidden-state handoff carries no object reference")
    arr: np.ndarray = await hidden.ref
    with warnings.catch_warnings():            # the store's buffer is read-only; the engine copies it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


@serve.deployment
class DiTDeployment(StageReplica):
    def __init__(self, stage: str, config: dict, services: dict | None = None):
        self.stage = stage
        self.config: DiTStageConfig = validate(DiTStageConfig, config)
        self.model = self.config.engine.model.served_name
        self.engine = DiTStageEngine(self.config.engine)
        self.engine.start()
        self.cache = dit_cache(services)
        capacity = min(self.config.deployment.max_ongoing_requests, self.config.engine.max_batch_size)
        self.capacity = CapacityReporter(services, stage, capacity)
        self.start_metrics(services, self.model)
        log.info("DiT stage %r ready: model %s (cache %s)", stage, self.model, "on" if self.cache else "off")

    async def generate(self, req: DiTRequest) -> AsyncIterator[dict]:
        """Progress events, then ``done`` with PNGs; a client error comes as the last item (a value)."""
        async for ev in errors_as_values(self._tracked(req)):
            yield ev

    async def _tracked(self, req: DiTRequest) -> AsyncIterator[dict]:
        events = self._generate(req)
        with self.metrics.track(req.request_id, "images"):
            try:
                async for ev in events:
                    yield ev
            finally:
                await events.aclose()

    async def _generate(self, req: DiTRequest) -> AsyncIterator[dict]:
        hidden = req.conditioning
        info: dict = {"received_object_id": hidden.ref.hex()} if hidden is not None and hidden.ref is not None else {}
        key = self._image_key(req)
        if key is not None:
            pngs = await self.cache.get(key)
            self.metrics.cache_lookup("image", pngs is not None)
            if pngs is not None:
                yield {"kind": "done", "images": list(pngs), "info": info | {"image_cache": "hit"}}
                return
        embeds, mask = None, None
        if hidden is not None:
            embeds = await fetch_hidden(hidden)
        elif isinstance(req.prompt, str) and req.prompt.strip():
            embeds, mask = await self._conditioning(req)
        async for ev in self.engine.generate(req, embeds, mask):
            if ev["kind"] == "done":
                pngs = [to_png(im) for im in ev["images"]]
                if key is not None:
                    await self.cache.put(key, pngs, model=self.model)
                info |= dict(ev.get("info") or {}) | {"image_cache": "miss" if key else "off"}
                ev = {"kind": "done", "images": pngs, "info": info}
            yield ev

    # ------------------------------------------------------------------ cache
    def _image_key(self, req: DiTRequest) -> str | None:
        if self.cache is None:
            return None
        from omni_ray.cluster.dit_cache import image_key

        hidden = req.conditioning
        what = req.prompt if hidden is None else json.dumps(hidden.source, sort_keys=True)
        if not what or (hidden is not None and not hidden.source):
            return None
        return image_key(self.model, what, req.params.key_fields())

    async def _conditioning(self, req: DiTRequest):
        """(embeds [T, H], mask [T]) from the cache, or from the text encoder (then cached); (None,
        None) when the cache is off or the model has no text encoder (the engine encodes)."""
        fam = self.engine.family
        if self.cache is None or not self.cache.cfg.cache_conditioning or not fam.has_text_encoder:
            return None, None
        from omni_ray.cluster.dit_cache import conditioning_key

        key = conditioning_key(self.model, req.prompt, "text_encoder",
                               max_len=self.config.engine.max_sequence_length)
        hit = await self.cache.get(key)
        self.metrics.cache_lookup("conditioning", hit is not None)
        if hit is not None:
            return hit
        value = await self.engine.encode(req)
        await self.cache.put(key, value, model=self.model)
        return value

    # ------------------------------------------------------------------ health and stats
    def info(self) -> dict:
        m = self.config.engine.model
        return {"stage": self.stage, "kind": "dit", "model": m.served_name, "path": m.path,
                "device": self.config.engine.device, "cache": self.cache is not None}
