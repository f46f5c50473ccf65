"""Diffusers-format DiT checkpoints with random weights, seeded, built locally.

Each builder writes what a hub download holds: ``model_index.json`` and one folder per component
(``transformer/``, ``vae/``, ``scheduler/``, ``text_encoder*/``, ``tokenizer*/``), weights as
safetensors, every model built from its library's own config class. ``tiny:*`` entries are
small enough for CPU tests; ``shape:*`` entries have a real model's transformer and VAE shapes
(benchmarks time the transformer; their text encoders stay tiny).

    tiny:pixart         PixArt-Sigma: T5 encoder, SD VAE, DPM-Solver++
    tiny:sd3            SD3 MMDiT (with SD3.5's qk-norm and a dual-attention block): 2 CLIP + T5,
                        16-channel VAE, flow-matching Euler
    tiny:pixart-llm     PixArt conditioned on an LLM's hidden states (caption dim = tiny:qwen3's
                        hidden size, 64); no text encoder, requests bring ``prompt_embeds``
    shape:pixart-sigma-xl   PixArt-Sigma-XL-2 (28 layers, 1152 wide, caption 4096 x 300), real SD VAE
    shape:sd3-medium        SD3-medium (24 layers, 1536 wide), real SD3 VAE
    shape:pixart-sigma-llm-0.6b  PixArt-Sigma-XL conditioned on shape:qwen3-0.6b hidden states (1024)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from omni_ray.testing.tokenizer import save_tokenizer

AR_HIDDEN = {"tiny:qwen3": 64}          # the AR models a tiny LLM-conditioned DiT can follow

PIXART_SCHEDULER = dict(  # PixArt-Sigma's scheduler_config.json
    algorithm_type="dpmsolver++", beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
    lower_order_final=True, num_train_timesteps=1000, prediction_type="epsilon", solver_order=2,
    solver_type="midpoint", steps_offset=0, thresholding=False, timestep_spacing="linspace",
    use_karras_sigmas=False, variance_type=None)

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

SD_VAE = dict(  # the SD / SDXL VAE (PixArt-Sigma uses SDXL's)
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)

SD3_VAE = dict(SD_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)

TINY_VAE = dict(  # scale factor 4, few channels
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.5)


# ----------------------------------------------------------------------------- components
def _tokenizer(out: Path, kind: str, max_len: int) -> int:
    """A local BPE tokenizer that behaves like T5's (appends EOS) or CLIP's (BOS ... EOS).
    Returns the EOS id."""
    from tokenizers import Tokenizer, processors

    out.mkdir(parents=True)
    special = save_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos, bos = "<|im_end|>", "<|begin_of_text|>"
    if kind == "clip":
        eos = "<|endoftext|>"
        tmpl = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[
            (bos, special[bos]), (eos, special[eos])])
    else:
        tmpl = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, special[eos])])
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), tmpl])
    tok.save(str(out / "tokenizer.json"))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(model_max_length=max_len, eos_token=eos, bos_token=bos if kind == "clip" else None)
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: cfg[k] for k in ("eos_token", "pad_token", "bos_token") if cfg.get(k)}, indent=2))
    return special[eos]


def _t5(out: Path, d_model: int, eos: int) -> None:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=1024, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=eos, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(out, safe_serialization=True)


def _clip(out: Path, hidden: int, proj: int, eos: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=proj,
                         hidden_act="quick_gelu", bos_token_id=3, eos_token_id=eos, pad_token_id=0)
    CLIPTextModelWithProjection(cfg).save_pretrained(out, safe_serialization=True)


def _save(model, out: Path, dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)


def _write_index(out: Path, pipeline: str, components: dict[str, tuple[str, str] | None]) -> None:
    import diffusers

    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    index.update({k: list(v) if v else [None, None] for k, v in components.items()})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- families
def build_pixart(out: Path, transformer: dict, vae: dict, t5_dim: int | None, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
    """PixArt-Sigma layout. ``t5_dim=None``: no text encoder (LLM-conditioned)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    comps: dict = {"scheduler": ("diffusers", "DPMSolverMultistepScheduler"),
                   "transformer": ("diffusers", "PixArtTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
                   "text_encoder": None, "tokenizer": None}
    _save(PixArtTransformer2DModel(**transformer), out / "transformer", dtype)
    _save(AutoencoderKL(**vae), out / "vae", dtype)
    DPMSolverMultistepScheduler(**PIXART_SCHEDULER).save_pretrained(out / "scheduler")
    if t5_dim is not None:
        eos = _tokenizer(out / "tokenizer", "t5", 512)
        _t5(out / "text_encoder", t5_dim, eos)
        comps.update(text_encoder=("transformers", "T5EncoderModel"),
                     tokenizer=("transformers", "PreTrainedTokenizerFast"))
    _write_index(out, "PixArtSigmaPipeline", comps)


def build_sd3(out: Path, transformer: dict, vae: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    joint, pooled = transformer["joint_attention_dim"], transformer["pooled_projection_dim"]
    _save(SD3Transformer2DModel(**transformer), out / "transformer", dtype)
    _save(AutoencoderKL(**vae), out / "vae", dtype)
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(out / "scheduler")
    clip_hidden = joint // 2                     # the two CLIP states, concatenated, pad to T5's width
    for sfx in ("", "_2"):
        eos = _tokenizer(out / f"tokenizer{sfx}", "clip", 77)
        _clip(out / f"text_encoder{sfx}", clip_hidden, pooled // 2, eos)
    eos = _tokenizer(out / "tokenizer_3", "t5", 512)
    _t5(out / "text_encoder_3", joint, eos)
    tok = ("transformers", "PreTrainedTokenizerFast")
    _write_index(out, "StableDiffusion3Pipeline", {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "transformer": ("diffusers", "SD3Transformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"), "tokenizer": tok,
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"), "tokenizer_2": tok,
        "text_encoder_3": ("transformers", "T5EncoderModel"), "tokenizer_3": tok,
        "image_encoder": None, "feature_extractor": None})


def _tiny_pixart(caption_channels: int) -> dict:
    return dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
                cross_attention_dim=32, caption_channels=caption_channels, sample_size=8, patch_size=2,
                use_additional_conditions=False, norm_type="ada_norm_single", num_embeds_ada_norm=1000)


TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32,
                dual_attention_layers=(0,), qk_norm="rms_norm")

PIXART_SIGMA_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                       num_layers=28, cross_attention_dim=1152, caption_channels=4096, sample_size=128,
                       patch_size=2, use_additional_conditions=False, norm_type="ada_norm_single",
                       num_embeds_ada_norm=1000, interpolation_scale=2)

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)


def builders() -> dict[str, Callable[[Path], None]]:
    tiny_sd3_vae = dict(TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
    return {
        "tiny:pixart": lambda p: build_pixart(p, _tiny_pixart(32), TINY_VAE, t5_dim=32),
        "tiny:pixart-llm": lambda p: build_pixart(p, _tiny_pixart(AR_HIDDEN["tiny:qwen3"]), TINY_VAE, t5_dim=None,
                                                  seed=1),
        "tiny:sd3": lambda p: build_sd3(p, TINY_SD3, tiny_sd3_vae),
        "shape:pixart-sigma-xl": lambda p: build_pixart(p, PIXART_SIGMA_XL, SD_VAE, t5_dim=4096,
                                                        dtype=torch.bfloat16),
        "shape:sd3-medium": lambda p: build_sd3(p, SD3_MEDIUM, SD3_VAE, dtype=torch.bfloat16),
        # PixArt-Sigma-XL conditioned on Qwen3-0.6B's hidden states (1024 wide), as Qwen-Image / Sana do
        "shape:pixart-sigma-llm-0.6b": lambda p: build_pixart(p, dict(PIXART_SIGMA_XL, caption_channels=1024), SD_VAE,
                                                              t5_dim=None, dtype=torch.bfloat16),
    }

