"""Decoder architectures the AR engine runs, keyed by HF ``model_type``."""

from omni_ray.ar.models.decoder import ArchConfig, DecoderForCausalLM

# multimodal encoders (not decoders; loaded beside one): omni_ray.ar.models.qwen2_5_vl_vision.load_vision_tower,
# omni_ray.ar.models.qwen2_5_omni_audio.load_audio_tower

# qwen2_5_vl / qwen2_5_omni / qwen2_5_omni_thinker: their language models (M-RoPE; omni_ray.ar.models.mrope)
# qwen2_5_omni_talker: the Omni talker (model.submodel: talker; omni_ray.ar.models.qwen2_5_omni_talker)
SUPPORTED = ("qwen3", "qwen2", "llama", "qwen2_5_vl", "qwen2_5_omni", "qwen2_5_omni_thinker", "qwen2_5_omni_talker")


def arch_config(cfg: dict, submodel: str | None = None) -> ArchConfig:
    """The architecture of a checkpoint's config.json; ``submodel="talker"``: the Qwen2.5-Omni talker's."""
    from omni_ray.errors import ConfigError

    if submodel is None:
        return ArchConfig.from_hf(cfg)
    if submodel == "talker":
        from omni_ray.ar.models.qwen2_5_omni_talker import talker_arch
        return talker_arch(cfg)
    raise ConfigError(f"unknown submodel {submodel!r} (known: talker)")


def build_model(arch: ArchConfig, tp=None, backend: str = "torch", ops=None) -> DecoderForCausalLM:
    """The module for ``arch``: the talker for ``qwen2_5_omni_talker``, the Llama-family decoder otherwise."""
    from omni_ray.ar.layers.parallel import TP1
    from omni_ray.ar.models.qwen2_5_omni_talker import MODEL_TYPE, Qwen2_5OmniTalkerForCausalLM

    cls = Qwen2_5OmniTalkerForCausalLM if arch.model_type == MODEL_TYPE else DecoderForCausalLM
    return cls(arch, tp or TP1, backend, ops)


__all__ = ["ArchConfig", "DecoderForCausalLM", "SUPPORTED", "arch_config", "build_model"]
