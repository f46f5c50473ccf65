"""The AR text engine: paged KV cache, prefix caching, continuous batching, CUDA graphs."""

from omni_ray.ar.engine.llm_engine import LLM, LLMEngine
from omni_ray.ar.sampling_params import EncodeParams, SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "EncodeParams", "AsyncLLM", "RequestOutput"]


def __getattr__(name):
    if name in ("AsyncLLM", "RequestOutput"):
        from omni_ray.ar.engine import async_engine
        return getattr(async_engine, name)
    raise AttributeError(name)
