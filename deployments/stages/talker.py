"""The talker stage deployment (speech out): one talker engine per replica (``omni_ray.stages.talker.
TalkerStageEngine``: the Qwen2.5-Omni talker on the AR engine), its requests batched by the engine's loop.

    handle.options(stream=True).generate.remote(TalkerRequest)
        -> {"replica": id}, then {"codes": [codec ids], "finished", "finish_reason", "num_codes"} ...
    await handle.feed.remote(request_id, ThinkerRows, replica=id)   -> None (routed to that replica)
    await handle.abort.remote([request_id], replica=id)

The thinker's hidden states reach this replica as Handoffs holding ObjectRefs (``req.prompt_hidden``, each
feed's ``rows.hidden``: the thinker replica put them in the object store); they are resolved here, and
nowhere between (not in the ingress). A caller that cancels the stream (the client went away) aborts
the request in the engine (``fed.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import AsyncIterator

from ray import serve

from deployments.services import CapacityReporter, replica_id
from deployments.stages.fed import FedStageReplica, fed_stream
from deployments.stages.replica import error_as_value
from deployments.streams import OpenStreams
from omni_ray.config import ARStageConfig, LimitsConfig, validate
from omni_ray.errors import OmniError
from omni_ray.stages.requests import Handoff, TalkerRequest, ThinkerRows
from omni_ray.stages.talker import TalkerStageEngine

log = logging.getLogger("ray.serve")


async def by_value(h: Handoff | None) -> Handoff | None:
    """A Handoff with its rows resolved here from the object store (``Handoff.resolve``); one by value, or
    None, as it is."""
    if h is None or h.ref is None:
        return h
    t = await h.resolve()
    return Handoff(shape=list(t.shape), tensor=t, dtype=h.dtype)


def merge_codes(items: list[dict]) -> dict:
    """Consecutive talker deltas as one: their codes in order, the last one's state."""
    out = dict(items[-1])
    out["codes"] = [c for d in items for c in d["codes"]]
    return out


@serve.deployment
class TalkerDeployment(FedStageReplica):
    kind = "talker"

    def __init__(self, stage: str, config: dict, limits: dict | None = None, services: dict | None = None):
        self.stage, self.replica = stage, replica_id()
        self.config: ARStageConfig = validate(ARStageConfig, config)       # model.submodel: talker
        self.engine = TalkerStageEngine(self.config.engine_config(), validate(LimitsConfig, limits or {}))
        self.engine.start()
        self.streams = OpenStreams(self.config.streaming)       # paced as the AR stage's streams (``streaming:``)
        capacity = min(self.config.deployment.max_ongoing_requests, self.config.engine.scheduler.max_num_seqs)
        self.capacity = CapacityReporter(services, stage, capacity)
        self.start_metrics(services, self.engine.model_name)
        log.info("talker stage %r ready: model %s, voices %s", stage, self.engine.model_name, self.engine.voices)

    async def generate(self, req: TalkerRequest) -> AsyncIterator[dict]:
        """``{"replica": id}``, then the codec tokens as the engine makes them (what comes within this replica's
        stream interval merged into one message: under load one message, and one token2wav feed, per several
        engine steps); a client error is the last item."""
        codes = self.streams.stream(self._codes(req), merge_codes)
        async for item in fed_stream(self.replica, req.request_id, self.engine, codes):
            yield item

    def _codes(self, req: TalkerRequest) -> AsyncIterator[dict]:
        async def start():
            return self.engine.generate(dataclasses.replace(req, prompt_hidden=await by_value(req.prompt_hidden)))
        return self.tracked(req.request_id, "codes", start)

    async def feed(self, request_id: str, rows: ThinkerRows, replica: str | None = None) -> OmniError | None:
        """The thinker's next rows for ``request_id`` (``replica``: routes this call to its stream's replica)."""
        return await error_as_value(self._feed(request_id, rows))

    async def _feed(self, request_id: str, rows: ThinkerRows) -> None:
        await self.engine.feed(request_id, dataclasses.replace(rows, hidden=await by_value(rows.hidden)))
