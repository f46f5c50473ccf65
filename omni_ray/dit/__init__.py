"""The DiT image engine: diffusers-format DiT families, step-level continuous batching,
per-request step caching, an offline API (``DiTEngine``) and an asyncio API (``AsyncDiTEngine``)."""

from omni_ray.dit.async_engine import AsyncDiTEngine
from omni_ray.dit.engine import DiTEngine
from omni_ray.dit.params import DiffusionParams, DiTEvent, StepCacheParams

__all__ = ["AsyncDiTEngine", "DiTEngine", "DiTEvent", "DiffusionParams", "StepCacheParams"]
