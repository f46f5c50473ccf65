"""The encoder stage deployment: the media towers of a multimodal checkpoint, one
``EncoderStageEngine`` per replica, used by the AR stages whose ``encoder`` names it.

    refs = await handle.encode.remote([MediaItem, ...])   -> one ObjectRef per item: its embedding
                                                            [item.length, hidden] (a CPU tensor)

The AR replica (not the ingress) calls it and resolves the refs itself (``remote_encoder``), so the
embeddings go from this replica to the decoder's through the object store, never through the
ingress. Concurrent calls are batched by the engine (one tower call per kind). The refs are pinned
here for a while (deployments/stages/pins.py says why). A client error comes back as a value.
"""

from __future__ import annotations

import asyncio
import logging

import ray
import torch
from ray import serve

from deployments.services import CapacityReporter
from deployments.stages.pins import Pins
from deployments.stages.replica import StageReplica, error_as_value
from omni_ray.ar.multimodal import MediaItem
from omni_ray.config import EncoderStageConfig, validate
from omni_ray.errors import EngineError, OmniError
from omni_ray.stages.encoder import EncoderStageEngine

log = logging.getLogger("ray.serve")


def remote_encoder(handle):
    """An AR stage's ``encoder`` over an encoder deployment's handle: items -> embeddings, the refs
    resolved in the calling (AR) replica."""
    async def encode(items: list[MediaItem]) -> list[torch.Tensor]:
        out = await handle.encode.remote(items)
        if isinstance(out, OmniError):
            raise out
        return list(await asyncio.gather(*out))
    return encode


@serve.deployment
class EncoderDeployment(StageReplica):
    def __init__(self, stage: str, config: dict, services: dict | None = None):
        self.stage = stage
        self.config: EncoderStageConfig = validate(EncoderStageConfig, config)
        self.engine = EncoderStageEngine(self.config.engine)
        self.engine.start()
        self.pins = Pins()
        # the admission scheduler gates pipeline steps; this stage is none (its AR callers are): no reports
        self.capacity = CapacityReporter(None, stage, self.config.deployment.max_ongoing_requests)
        self.start_metrics(services, self.engine.model_name)
        log.info("encoder stage %r ready: model %s", stage, self.engine.model_name)

    async def encode(self, items: list[MediaItem]) -> list | OmniError:
        """One ObjectRef per item, in order (batched with the other calls this replica gets)."""
        return await error_as_value(self._encode(items))

    async def _encode(self, items: list[MediaItem]) -> list:
        if not isinstance(items, list) or not all(isinstance(it, MediaItem) for it in items):
            raise EngineError("encode takes a list of MediaItems")
        refs = []
        for e in await self.engine.encode(items):
            ref = ray.put(e)
            self.pins.hold(ref, e.numel() * e.element_size())
            refs.append(ref)
        return refs

    def info(self) -> dict:
        m = self.config.engine.model
        return {"stage": self.stage, "kind": "encoder", "model": m.served_name, "path": m.path,
                "device": self.config.engine.device}
