"""The token2wav stage deployment (speech out): one token2wav engine per replica (``omni_ray.stages.token2wav.
Token2WavStageEngine``: the Qwen2.5-Omni flow-matching DiT and BigVGAN vocoder on the DiT engine), windows of
every request batched by the engine's loop.

    handle.options(stream=True).generate.remote(SpeechRequest)
        -> {"replica": id}, then {"pcm": float32 [n] in [-1, 1], "sample_rate", "finished"} per chunk, in order
    await handle.feed.remote(request_id, codes, finished, replica=id)   -> None (routed to that replica)
    await handle.abort.remote([request_id], replica=id)

Codec tokens arrive by ``feed`` as the talker makes them (plain ints, by value); audio leaves by value (it
goes to the client anyway). A caller that cancels the stream aborts the request (``fed.py``).
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

from ray import serve

from deployments.services import CapacityReporter, replica_id
from deployments.stages.fed import FedStageReplica, fed_stream
from deployments.stages.replica import error_as_value
from omni_ray.config import DiTStageConfig, validate
from omni_ray.errors import OmniError
from omni_ray.stages.requests import SpeechRequest
from omni_ray.stages.token2wav import Token2WavStageEngine

log = logging.getLogger("ray.serve")


@serve.deployment
class Token2WavDeployment(FedStageReplica):
    kind = "token2wav"

    def __init__(self, stage: str, config: dict, services: dict | None = None):
        self.stage, self.replica = stage, replica_id()
        self.config: DiTStageConfig = validate(DiTStageConfig, config)      # a Qwen2.5-Omni checkpoint
        self.engine = Token2WavStageEngine(self.config.engine)
        self.engine.start()
        capacity = min(self.config.deployment.max_ongoing_requests, self.config.engine.max_batch_size)
        self.capacity = CapacityReporter(services, stage, capacity)
        self.start_metrics(services, self.engine.model_name)
        log.info("token2wav stage %r ready: model %s, voices %s", stage, self.engine.model_name, self.engine.voices)

    async def generate(self, req: SpeechRequest) -> AsyncIterator[dict]:
        """``{"replica": id}``, then the waveform chunk by chunk; a client error is the last item."""
        async for item in fed_stream(self.replica, req.request_id, self.engine, self._chunks(req)):
            yield item

    def _chunks(self, req: SpeechRequest) -> AsyncIterator[dict]:
        async def start():
            return self.engine.generate(req)
        return self.tracked(req.request_id, "audio", start)

    async def feed(self, request_id: str, codes: list[int], finished: bool,
                   replica: str | None = None) -> OmniError | None:
        """The talker's next codec tokens for ``request_id`` (``finished``: its last ones)."""
        return await error_as_value(self.engine.feed(request_id, list(codes), bool(finished)))
