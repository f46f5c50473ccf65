"""The DiT stage engine: typed ``DiTRequest``s over an ``AsyncDiTEngine`` (the ``StageEngine`` protocol).

``generate(req)`` yields plain dicts (what a Serve replica streams back):

    {"kind": "progress", "step", "total"} ... {"kind": "done", "images": [PIL], "info": {...}}

Conditioning: ``embeds`` [T, H] (``mask`` [T], default all ones) when given (an online replica
resolved the request's handoff reference, or found the text encoder's output in the DiT cache),
else the handoff's tensor (offline), else the engine encodes the prompt itself. The same for the
negative prompt's (``negative_conditioning``: true CFG of a model whose text encoder is an AR stage).
An edit's input image reaches the engine as PIL (online: the replica decoded the ingress's bytes).
"""

from __future__ import annotations

from typing import AsyncIterator

import torch

from omni_ray.config import DiTEngineConfig
from omni_ray.stages.protocol import EngineStage
from omni_ray.stages.requests import DiTRequest


class DiTStageEngine(EngineStage):
    kind = "dit"

    def __init__(self, config: DiTEngineConfig, engine=None):
        self.config = config
        self.engine = engine                   # an AsyncDiTEngine (built by ``start`` unless given)

    def start(self) -> None:
        if self.engine is None:
            from omni_ray.dit.async_engine import AsyncDiTEngine
            self.engine = AsyncDiTEngine(self.config)

    @property
    def family(self):
        return self.engine.engine.family

    async def generate(self, req: DiTRequest, embeds: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None, negative: torch.Tensor | None = None,
                       image=None) -> AsyncIterator[dict]:
        """``embeds`` / ``negative``: the prompt's and the negative prompt's hidden states [T, H] (an
        online replica resolved the handoffs; offline: the handoffs' tensors); ``image``: the edit's
        input image as PIL (offline: the request's own)."""
        if embeds is None and req.conditioning is not None:
            embeds = req.conditioning.tensor
        if negative is None and req.negative_conditioning is not None:
            negative = req.negative_conditioning.tensor
        if image is None and req.image is not None:
            image = req.image.image
        kw: dict = {}
        if embeds is not None:
            mask = mask if mask is not None else torch.ones(embeds.shape[0], dtype=torch.long)
            kw = {"prompt_embeds": embeds, "prompt_mask": mask}
        if negative is not None:
            kw |= {"negative_prompt_embeds": negative,
                   "negative_prompt_mask": torch.ones(negative.shape[0], dtype=torch.long)}
        if image is not None:
            kw["image"] = image
        async for ev in self.engine.generate(req.prompt, req.params, req.request_id, **kw):
            if ev.kind == "progress":
                yield {"kind": "progress", "step": ev.step, "total": ev.total}
            elif ev.kind == "done":
                yield {"kind": "done", "images": list(ev.images), "info": dict(ev.stats or {})}

    async def encode(self, req: DiTRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's (embeds [T, H], mask [T]) of the request's prompt, on the CPU."""
        embeds, mask = await self.engine.encode_prompt(req.prompt)
        return embeds[0], mask[0]
