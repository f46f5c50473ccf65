"""omni-ray: serve multi-stage omni generative models (AR text + DiT image) on Ray.

    from omni_ray import OmniLLM          # the pipelines offline, in one process (loaded on first use)
"""

__version__ = "0.1.0"

_EXPORTS = {"OmniLLM": "omni_ray.offline", "PipelineOutput": "omni_ray.offline"}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'omni_ray' has no attribute {name!r}")
