"""The DiT stage deployment: one ``AsyncDiTEngine`` per replica, requests batched by its loop.

    handle.options(stream=True).generate.remote(req)
        -> {"kind": "progress", "step", "total"} ... {"kind": "done", "images": [PNG bytes], "info"}

``req`` is an ``omni_ray.stages.DiTRequest``; the replica is a thin shim over the stage engine
(``omni_ray.stages.dit.DiTStageEngine``). ``req.conditioning`` is an AR stage's Handoff (an
ObjectRef, its shape and source): this replica is the first place the hidden-state tensor is
materialised (from the object store, zero-copy on one node). Images leave the replica as PNG bytes,
videos (families that make them) as MP4 bytes: ``{"kind": "done", "videos": [MP4 bytes], "info"}``.

With ``dit_cache.enabled`` the replica consults the application's DiT cache:
  * images of a deterministic request (it has a seed): a hit skips the engine entirely;
  * text-encoder conditioning of a prompt: a hit skips the text encoder (``prompt_embeds``).
Image keys of hidden-state requests are what the hand-offs are a function of (the encoder's model and
input, the negative prompt's too) and, for an edit, the input image's digest.

``req.negative_conditioning`` (true CFG when the text encoder is an AR stage) is resolved here beside
``req.conditioning``; ``req.image`` (an edit's input image) holds the ref of the bytes the ingress put
once in the object store, resolved and decoded here.
"""

from __future__ import annotations

import asyncio
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
from omni_ray.config import DiTStageConfig, MediaConfig, validate
from omni_ray.errors import InvalidRequestError
from omni_ray.media.images import decode_image
from omni_ray.media.video import encode_mp4
from omni_ray.stages.dit import DiTStageEngine
from omni_ray.stages.requests import DiTRequest, Handoff, ImageInput

log = logging.getLogger("ray.serve")
DEFAULT_FPS = 16                         # Wan's frame rate


def to_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def _none():
    return None


async def fetch_image(image: ImageInput, media: MediaConfig):
    """The edit's input image as PIL: the ingress's bytes (checked there under app.media) from the
    object store, decoded here under the same limits; offline requests carry the image itself."""
    if image.image is not None:
        return image.image
    if image.ref is None:
        raise InvalidRequestError("the input image carries neither an image nor an object reference", param="image")
    data = await image.ref
    return decode_image(data, "image", media)


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
    def __init__(self, stage: str, config: dict, services: dict | None = None, media: dict | None = None):
        self.stage = stage
        self.config: DiTStageConfig = validate(DiTStageConfig, config)
        self.media: MediaConfig = validate(MediaConfig, media or {})     # edits' input images (app.media)
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
        hidden, neg = req.conditioning, req.negative_conditioning
        info: dict = {"received_object_id": hidden.ref.hex()} if hidden is not None and hidden.ref is not None else {}
        if neg is not None and neg.ref is not None:
            info["received_negative_object_id"] = neg.ref.hex()
        key = self._image_key(req)
        if key is not None:
            pngs = await self.cache.get(key)
            self.metrics.cache_lookup("image", pngs is not None)
            if pngs is not None:
                yield {"kind": "done", "images": list(pngs), "info": info | {"image_cache": "hit"}}
                return
        embeds, mask, negative = None, None, None
        if hidden is not None:      # the prompt's and the negative prompt's, resolved together
            embeds, negative = await asyncio.gather(fetch_hidden(hidden), fetch_hidden(neg) if neg else _none())
        elif isinstance(req.prompt, str) and req.prompt.strip():
            embeds, mask = await self._conditioning(req)
        image = await fetch_image(req.image, self.media) if req.image is not None else None
        async for ev in self.engine.generate(req, embeds, mask, negative, image):
            if ev["kind"] == "done" and self.engine.family.produces_video:      # frames -> MP4, off the loop
                videos = [await asyncio.to_thread(encode_mp4, v, req.fps or DEFAULT_FPS) for v in ev["images"]]
                ev = {"kind": "done", "videos": videos, "info": info | dict(ev.get("info") or {})}
            elif ev["kind"] == "done":
                pngs = [to_png(im) for im in ev["images"]]
                if key is not None:
                    await self.cache.put(key, pngs, model=self.model)
                info |= dict(ev.get("info") or {}) | {"image_cache": "miss" if key else "off"}
                ev = {"kind": "done", "images": pngs, "info": info}
            yield ev

    # ------------------------------------------------------------------ cache
    def _image_key(self, req: DiTRequest) -> str | None:
        if self.cache is None or self.engine.family.produces_video:     # videos are kept by the video jobs
            return None
        from omni_ray.cluster.dit_cache import image_key

        hidden, neg = req.conditioning, req.negative_conditioning
        if hidden is not None and (not hidden.source or (neg is not None and not neg.source)):
            return None
        what = req.prompt if hidden is None else json.dumps(
            [hidden.source] + ([neg.source] if neg is not None else []), sort_keys=True)
        if not what:
            return None
        if req.image is not None:           # an edit: the input image is part of what the image is a function of
            what = f"{what}|image:{req.image.digest}"
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
