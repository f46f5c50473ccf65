"""omni-ray: serve multi-stage omni generative models (AR text + DiT image) on Ray.

The two documented offline styles import from here (loaded on first use):

    from omni_ray import LLM, SamplingParams                 # nano-vllm's API
    from omni_ray import OmniLLM, AsyncOmniLLM, create_ar_stage_config, create_dit_stage_config  # vLLM-omni's
"""

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "omni_ray.ar", "LLMEngine": "omni_ray.ar", "SamplingParams": "omni_ray.ar",
    "OmniLLM": "omni_ray.offline", "AsyncOmniLLM": "omni_ray.offline", "PipelineOutput": "omni_ray.offline",
    "create_ar_stage_config": "omni_ray.vllm_omni_api", "create_dit_stage_config": "omni_ray.vllm_omni_api",
    "OmniStageConfig": "omni_ray.vllm_omni_api",
    "OmniError": "omni_ray.errors", "ProcessingError": "omni_ray.errors", "EngineError": "omni_ray.errors",
    "InvalidRequestError": "omni_ray.errors", "ConfigError": "omni_ray.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'omni_ray' has no attribute {name!r}")
