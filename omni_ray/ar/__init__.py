"""The AR text engine: paged KV cache, prefix caching, continuous batching, CUDA graphs.

Loaded on first use: the request types (``omni_ray.ar.sampling_params``) import without the engine."""

_EXPORTS = {"LLM": "omni_ray.ar.engine.llm_engine", "LLMEngine": "omni_ray.ar.engine.llm_engine",
            "SamplingParams": "omni_ray.ar.sampling_params", "EncodeParams": "omni_ray.ar.sampling_params",
            "AsyncLLM": "omni_ray.ar.engine.async_engine", "RequestOutput": "omni_ray.ar.engine.async_engine",
            "TextEncoding": "omni_ray.ar.text_encoding", "text_encoding_for": "omni_ray.ar.text_encoding",
            "InputEmbeds": "omni_ray.ar.input_embeds",
            "TalkerInput": "omni_ray.ar.models.qwen2_5_omni_talker_inputs",
            "talker_sampling_params": "omni_ray.ar.models.qwen2_5_omni_talker_inputs"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
