"""Qwen-Image checkpoints in the diffusers layout: ``tiny:qwen-image``, ``tiny:qwen-image-edit``,
``shape:qwen-image``.

The hub's ``Qwen/Qwen-Image`` directory, scaled down: ``model_index.json`` of ``QwenImagePipeline``
(``QwenImageEditPipeline`` adds ``processor/``), ``transformer/`` (``QwenImageTransformer2DModel``),
``vae/`` (``AutoencoderKLQwenImage``), ``text_encoder/`` (``Qwen2_5_VLForConditionalGeneration``, the
tiny Qwen2.5-VL of ``tiny_mm``), ``tokenizer/``, ``scheduler/`` (the hub's
``FlowMatchEulerDiscreteScheduler`` settings). ``QwenImagePipeline.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

# the hub's scheduler/scheduler_config.json of Qwen/Qwen-Image (and -Edit)
QWEN_IMAGE_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                            max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                            stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                            use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)

# the hub's transformer/config.json (20B MMDiT) and vae/config.json
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=(16, 56, 56))
QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)

# tiny: 2 blocks of 2 heads x 16 (axes 4 + 6 + 6), VAE base 8 (scale factor 8 as the real one), the tiny VL's width
TINY_TRANSFORMER = dict(QWEN_IMAGE_TRANSFORMER, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                        axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(QWEN_IMAGE_VAE, base_dim=8, num_res_blocks=1)


def _text_encoder_parts(out: Path, processor: bool, seed: int, shape: bool) -> int:
    """text_encoder/, tokenizer/ (and processor/) from a Qwen2.5-VL checkpoint; returns its hidden size."""
    from omni_ray.testing.tiny_mm import build_qwen2_5_vl, build_qwen2_5_vl_7b_shape

    with tempfile.TemporaryDirectory() as tmp:
        vl = Path(tmp)
        (build_qwen2_5_vl_7b_shape if shape else build_qwen2_5_vl)(vl, seed=seed)
        enc, tok = out / "text_encoder", out / "tokenizer"
        enc.mkdir()
        tok.mkdir()
        tok_files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        for f in vl.iterdir():
            if f.name in tok_files or f.name == "chat_template.jinja":
                shutil.copy(f, tok / f.name)
            elif f.name not in ("preprocessor_config.json",):
                shutil.move(f, enc / f.name)            # moved: the 7B shape's weights are never on disk twice
        if processor:
            proc = out / "processor"
            proc.mkdir()
            for name in tok_files + ("preprocessor_config.json", "chat_template.jinja"):
                shutil.copy(vl / name, proc / name)
        return json.loads((enc / "config.json").read_text())["text_config"]["hidden_size"]


def build_qwen_image(out: Path, edit: bool = False, seed: int = 0, shape: bool = False, denoiser: bool = True) -> None:
    """A Qwen-Image (``edit``: Qwen-Image-Edit) directory; ``shape``: the real dimensions in bf16;
    ``denoiser=False``: the text encoder's parts only (transformer and VAE ``[null, null]`` in the index:
    what an AR stage loads, without writing the 20B transformer: 16 GB on disk instead of 57)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from omni_ray.testing.tiny_dit import _save, _write_index

    dtype = torch.bfloat16 if shape else torch.float32
    device = "cuda" if shape and torch.cuda.is_available() else "cpu"
    hidden = _text_encoder_parts(out, edit, seed, shape)
    comps = {"scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
             "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
             "tokenizer": ("transformers", "Qwen2Tokenizer"),
             "transformer": ("diffusers", "QwenImageTransformer2DModel") if denoiser else None,
             "vae": ("diffusers", "AutoencoderKLQwenImage") if denoiser else None}
    if edit:
        comps["processor"] = ("transformers", "Qwen2VLProcessor")
    FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER).save_pretrained(out / "scheduler")
    _write_index(out, "QwenImageEditPipeline" if edit else "QwenImagePipeline", comps)
    if not denoiser:
        return
    torch.manual_seed(seed + 1)
    tr_cfg = dict(QWEN_IMAGE_TRANSFORMER if shape else TINY_TRANSFORMER, joint_attention_dim=hidden)
    with torch.device(device):
        _save(QwenImageTransformer2DModel(**tr_cfg), out / "transformer", dtype)
        vae = AutoencoderKLQwenImage(**(QWEN_IMAGE_VAE if shape else TINY_VAE))
    if not shape:   # the hub's latents statistics are for the real VAE: tiny ones get their own, seeded
        g = torch.Generator().manual_seed(seed)
        vae.register_to_config(latents_mean=(torch.randn(16, generator=g) * 0.5).tolist(),
                               latents_std=(torch.rand(16, generator=g) + 0.5).tolist())
    _save(vae, out / "vae", dtype)


def builders() -> dict[str, Callable[[Path], None]]:
    return {
        "tiny:qwen-image": lambda p: build_qwen_image(p),
        "tiny:qwen-image-edit": lambda p: build_qwen_image(p, edit=True),
        "shape:qwen-image": lambda p: build_qwen_image(p, shape=True),
        "shape:qwen-image-edit": lambda p: build_qwen_image(p, edit=True, shape=True),
        "shape:qwen-image-text-encoder": lambda p: build_qwen_image(p, shape=True, denoiser=False),
    }
