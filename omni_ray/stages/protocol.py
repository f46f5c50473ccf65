"""What a stage engine offers the layers above it: the Serve stage deployments (thin shims over it,
as Ray Serve LLM's server is over its engine protocol) and the offline ``OmniLLM``.

    eng = ARStageEngine(engine_cfg, limits); eng.start()
    async for delta in eng.generate(ARRequest(...)): ...
    hs = await eng.encode(ARRequest(...))
    eng.abort(request_id); eng.check_health(); eng.stats(); await eng.shutdown()

Adapters: ``omni_ray.stages.ar.ARStageEngine`` (over ``AsyncLLM``), ``omni_ray.stages.dit.DiTStageEngine``
(over ``AsyncDiTEngine``), ``omni_ray.stages.encoder.EncoderStageEngine`` (media towers only). A talker or
vocoder stage is one more adapter.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol, runtime_checkable


@runtime_checkable
class StageEngine(Protocol):
    def start(self) -> None:
        """Build (load) the engine; idempotent."""

    def generate(self, request: Any) -> AsyncIterator[dict]:
        """The request's outputs as they come (AR: text deltas; DiT: progress, then done)."""

    async def encode(self, request: Any) -> Any:
        """The request's conditioning without generating (AR: prompt hidden states [T, H]; DiT:
        the text encoder's (embeds, mask))."""

    def abort(self, request_id: str) -> None:
        """Stop a request and free what it holds (an unknown id does nothing)."""

    def check_health(self) -> None:
        """Raise EngineError when the engine can no longer serve."""

    def stats(self) -> dict:
        """Counters and gauges (queue, running, cache) for metrics and /info."""

    async def shutdown(self) -> None:
        """Stop the engine and release its devices."""


class EngineStage:
    """What both adapters delegate to their async engine as it is (``self.engine``, built by ``start``)."""

    engine: Any = None

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def check_health(self) -> None:
        self.engine.check_health()

    def stats(self) -> dict:
        return self.engine.stats()

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()
