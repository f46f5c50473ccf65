"""Decoder architectures the AR engine runs, keyed by HF ``model_type``."""

from omni_ray.ar.models.decoder import ArchConfig, DecoderForCausalLM

SUPPORTED = ("qwen3", "qwen2", "llama")

__all__ = ["ArchConfig", "DecoderForCausalLM", "SUPPORTED"]
