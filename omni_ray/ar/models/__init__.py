"""Decoder architectures the AR engine runs, keyed by HF ``model_type``."""

from omni_ray.ar.models.decoder import ArchConfig, DecoderForCausalLM

# multimodal encoders (not decoders; loaded beside one): omni_ray.ar.models.qwen2_5_vl_vision.load_vision_tower,
# omni_ray.ar.models.qwen2_5_omni_audio.load_audio_tower

# qwen2_5_vl / qwen2_5_omni / qwen2_5_omni_thinker: their language models (M-RoPE; omni_ray.ar.models.mrope)
SUPPORTED = ("qwen3", "qwen2", "llama", "qwen2_5_vl", "qwen2_5_omni", "qwen2_5_omni_thinker")

__all__ = ["ArchConfig", "DecoderForCausalLM", "SUPPORTED"]
