"""Today's model families as stage graphs (one entry per checkpoint class)."""

from __future__ import annotations

from omni_ray.graphs.graph import StageGraph, StageNode
from omni_ray.graphs.registry import register


@register("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
def causal_lm(cfg: dict) -> StageGraph:
    """A decoder LLM: one AR stage, text in, text out."""
    return StageGraph(cfg["architectures"][0], (StageNode("llm", "ar", "prompt", "text"),))


@register("Qwen2_5_VLForConditionalGeneration")
def vision_language(cfg: dict) -> StageGraph:
    """Qwen2.5-VL: one AR stage running the vision tower beside the decoder: text and images in, text out."""
    return StageGraph(cfg["architectures"][0], (StageNode("llm", "ar", "prompt", "text"),),
                      inputs=frozenset({"text", "image"}))


@register("Qwen2_5OmniThinkerForConditionalGeneration")
def omni_thinker(cfg: dict) -> StageGraph:
    """A Qwen2.5-Omni thinker-only checkpoint: one AR stage with the vision and audio towers: text, images
    and audio in, text out."""
    return StageGraph(cfg["architectures"][0], (StageNode("thinker", "ar", "prompt", "text"),),
                      inputs=frozenset({"text", "image", "audio"}))


@register("Qwen2_5OmniForConditionalGeneration")
def omni_speech(cfg: dict) -> StageGraph:
    """Qwen2.5-Omni with speech out: the thinker (AR, with its towers) streams text and hands its hidden
    states to the talker (AR, ``model.submodel: talker``), whose codec tokens token2wav (DiT engine, float32)
    turns into a 24 kHz waveform; all three load the same directory. A request without ``audio`` runs the
    thinker alone (omni_ray/runner_speech.py). A checkpoint saved without its talker
    (``enable_audio_output: false``) is the thinker alone."""
    thinker = StageNode("thinker", "ar", "prompt", "text")
    if cfg.get("enable_audio_output") is False:
        return StageGraph(cfg["architectures"][0], (thinker,), inputs=frozenset({"text", "image", "audio"}))
    return StageGraph(cfg["architectures"][0], (thinker, StageNode("talker", "ar", "text", "codec_tokens",
                                                                   submodel="talker"),
                                                StageNode("token2wav", "dit", "codec_tokens", "audio")),
                      inputs=frozenset({"text", "image", "audio"}), outputs=frozenset({"text", "audio"}))


@register("PixArtSigmaPipeline", "StableDiffusion3Pipeline")
def text_to_image(cfg: dict) -> StageGraph:
    """A diffusers text-to-image pipeline. With its own text encoder, one DiT stage; with none
    (``text_encoder: [null, null]``), an AR stage's prompt hidden states condition the DiT."""
    arch = cfg["_class_name"]
    own_encoder = any(v[0] for k, v in cfg.items() if k.startswith("text_encoder") and isinstance(v, list))
    if own_encoder:
        nodes = (StageNode("denoiser", "dit", "prompt", "images"),)
    else:
        nodes = (StageNode("text_encoder", "ar", "prompt", "hidden_states"),
                 StageNode("denoiser", "dit", "hidden_states", "images"))
    return StageGraph(arch, nodes, outputs=frozenset({"image"}))


@register("QwenImagePipeline", "QwenImageEditPipeline")
def qwen_image(cfg: dict) -> StageGraph:
    """Qwen-Image: its Qwen2.5-VL text encoder on the AR engine (the pipeline's prompt template, its
    last hidden states) conditions the MMDiT + VAE on the DiT engine. One directory serves both
    stages: the AR stage loads its ``text_encoder/`` (and tokenizer / processor), the DiT stage the
    rest. Edit: the source image goes to both (the VL vision tower; the VAE's latents)."""
    arch = cfg["_class_name"]
    edit = arch == "QwenImageEditPipeline"
    nodes = (StageNode("text_encoder", "ar", "prompt", "hidden_states", component="text_encoder", encoding=arch),
             StageNode("denoiser", "dit", "hidden_states", "images"))
    need = frozenset({"text", "image"} if edit else {"text"})
    return StageGraph(arch, nodes, inputs=need, outputs=frozenset({"image"}), requires=need)


@register("WanPipeline", "WanImageToVideoPipeline")
def wan_video(cfg: dict) -> StageGraph:
    """Wan2.1 / Wan2.2 text- and image-to-video: one DiT stage (its UMT5 text encoder, and for I2V its
    CLIP image encoder, run inside it); Wan2.2 TI2V (``expand_timesteps``) takes an optional first frame.
    Videos are long jobs: the video API (``/v1/videos``) calls the stage itself; a pipeline of this graph
    (``output: videos``) streams the denoising progress and ends with the MP4."""
    arch = cfg["_class_name"]
    ti2v = bool(cfg.get("expand_timesteps"))        # Wan2.2 TI2V: text, or an image's first frame + text
    need = frozenset({"text", "image"} if arch == "WanImageToVideoPipeline" and not ti2v else {"text"})
    return StageGraph(arch, (StageNode("denoiser", "dit", "prompt", "video"),), outputs=frozenset({"video"}),
                      inputs=frozenset({"text", "image"}) if ti2v else need, requires=need)
