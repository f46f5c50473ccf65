"""The DiT image engine: diffusers-format DiT families, step-level continuous batching,
per-request step caching, an offline API (``DiTEngine``) and an asyncio API (``AsyncDiTEngine``).

Loaded on first use: the request types (``omni_ray.dit.params``) import without the engine."""

_EXPORTS = {"AsyncDiTEngine": "omni_ray.dit.async_engine", "DiTEngine": "omni_ray.dit.engine",
            "DiTEvent": "omni_ray.dit.params", "DiffusionParams": "omni_ray.dit.params",
            "StepCacheParams": "omni_ray.dit.params", "SpeechInput": "omni_ray.dit.speech"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
