"""Stage streams fed by later calls (speech out: the talker is fed the thinker's hidden states, token2wav the
talker's codec tokens, while their ``generate`` streams run).

    async for item in fed_stream(replica_id, request_id, engine, items): yield item

The first item names the replica, ``{"replica": id}``: the caller sends this request's ``feed`` calls with
``replica=id`` and the PinnedRouter (``deployments.stages.routing``) routes them here, to the engine that
holds the request. A client error ends the stream as its last item (a value: ``replica.py`` says why).
However the stream ends (finished, failed, or the caller cancelled it: the client went away), the
request is aborted in the engine (an abort of a finished request does nothing), so nothing it held, nor
a feed that comes after the end, is left behind.
"""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable

from deployments.stages.replica import StageReplica, errors_as_values
from omni_ray.config import ARStageConfig, DiTStageConfig, OmniConfig


def fed_stages(cfg: OmniConfig) -> dict[str, str]:
    """The speech stages of ``cfg`` (pipelines expanded): stage key -> ``talker`` (an AR stage running
    ``model.submodel: talker``) or ``token2wav`` (a DiT stage that a pipeline step feeds codec_tokens). They
    deploy as their own shims and are parts of their thinker's model, not models of their own."""
    out = {k: "talker" for k, s in cfg.stages.items()
           if isinstance(s, ARStageConfig) and s.engine.model.submodel == "talker"}
    for p in cfg.pipelines.values():
        for step in p.steps:
            if step.input == "codec_tokens" and isinstance(cfg.stages[step.stage], DiTStageConfig):
                out[step.stage] = "token2wav"
    return out


async def fed_stream(replica: str, request_id: str, engine, items: AsyncIterator[dict]) -> AsyncIterator:
    try:
        yield {"replica": replica}
        async for item in errors_as_values(items):
            yield item
    finally:
        engine.abort(request_id)


class FedStageReplica(StageReplica):
    """What the talker and token2wav replicas share: a request's engine stream under the replica's metrics,
    abort by id, and ``info``. Subclasses set ``kind`` and have ``stage``, ``config``, ``engine`` (with
    ``voices``) and ``metrics``."""

    kind: str

    async def tracked(self, request_id: str, what: str, start: Callable[[], Awaitable[AsyncIterator[dict]]]):
        """The engine stream ``await start()`` makes, item by item, counted in the metrics as ``what``; the
        stream is closed however this one ends."""
        with self.metrics.track(request_id, what):
            items = await start()
            try:
                async for d in items:
                    yield d
            finally:
                await items.aclose()

    def abort(self, request_ids: list[str], replica: str | None = None) -> None:
        for rid in request_ids:
            self.engine.abort(rid)

    def info(self) -> dict:
        m = self.config.engine.model
        return {"stage": self.stage, "kind": self.kind, "model": m.served_name, "path": m.path,
                "device": self.config.engine.device, "voices": list(self.engine.voices)}
