"""Wan checkpoints in the diffusers layout: ``tiny:wan2.1-t2v``, ``tiny:wan2.1-i2v``, ``tiny:wan2.2-t2v``,
``tiny:wan2.2-ti2v``.

The hub's ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` / ``Wan2.1-I2V-14B-480P-Diffusers`` /
``Wan2.2-T2V-A14B-Diffusers`` directories scaled down: ``model_index.json`` of ``WanPipeline`` or
``WanImageToVideoPipeline``, ``transformer/`` (``WanTransformer3DModel``; Wan2.2 adds ``transformer_2/``
and ``boundary_ratio``), ``vae/`` (``AutoencoderKLWan``, the real channel layout at base width 8: spatial
scale 8, temporal scale 4), ``text_encoder/`` (``UMT5EncoderModel``), ``tokenizer/``, ``scheduler/``
(the hub's ``UniPCMultistepScheduler`` settings, flow sigmas with shift 3), and for I2V
``image_encoder/`` (``CLIPVisionModel``) + ``image_processor/`` (``CLIPImageProcessor``). Random
weights, seeded; ``WanPipeline.from_pretrained(dir)`` loads it. ``tiny:wan2.2-ti2v`` is
``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` scaled down: ``expand_timesteps``, 48 latent channels in and out, the
Wan2.2 VAE (residual, 2 x 2 patchified, spatial scale 16, its own latent mean / std; decoder wider than
the encoder as there), flow shift 5 (diffusers' conversion script's settings).

The text context is 512 tokens as in the real models (Wan's I2V attention splits image from text
states at ``len - 512``), so CPU tests pay for a 512-token caption; everything else is tiny.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

# the hub's scheduler/scheduler_config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (flow_shift 3.0: 480p)
WAN_SCHEDULER = dict(beta_end=0.02, beta_schedule="linear", beta_start=0.0001, disable_corrector=[],
                     dynamic_thresholding_ratio=0.995, final_sigmas_type="zero", flow_shift=3.0,
                     lower_order_final=True, num_train_timesteps=1000, predict_x0=True,
                     prediction_type="flow_prediction", rescale_betas_zero_snr=False, sample_max_value=1.0,
                     solver_order=2, solver_p=None, solver_type="bh2", steps_offset=0, thresholding=False,
                     timestep_spacing="linspace", trained_betas=None, use_beta_sigmas=False,
                     use_exponential_sigmas=False, use_flow_sigmas=True, use_karras_sigmas=False)

# transformer/config.json of the hub's checkpoints
WAN21_T2V_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                      added_kv_proj_dim=None, rope_max_seq_len=1024)
WAN21_T2V_14B = dict(WAN21_T2V_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
WAN21_I2V_14B = dict(WAN21_T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)
WAN22_BOUNDARY_RATIO = 0.875          # Wan2.2-T2V-A14B's model_index.json
# Wan2.2-TI2V-5B (diffusers' scripts/convert_wan_to_diffusers.py: transformer, vae22_diffusers_config, flow shift)
WAN22_TI2V_5B = dict(WAN21_T2V_1_3B, num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48)
WAN22_VAE = dict(
    WAN_VAE, base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    latents_mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                  0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                  -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                  -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                  0.3573, -0.0548, -0.1681, -0.0667],
    latents_std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744])
WAN22_TI2V_FLOW_SHIFT = 5.0

# tiny: 2 blocks of 2 heads x 12 (rope axes 4 + 4 + 4), UMT5 of width 32, VAE base width 8
TINY_TRANSFORMER = dict(WAN21_T2V_1_3B, num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32,
                        ffn_dim=48, num_layers=2)
TINY_VAE = dict(WAN_VAE, base_dim=8, num_res_blocks=1)
TINY_TI2V_TRANSFORMER = dict(WAN22_TI2V_5B, num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32,
                             ffn_dim=48, num_layers=2)
TINY_VAE22 = dict(WAN22_VAE, base_dim=8, decoder_base_dim=16, num_res_blocks=1)
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                        image_size=32, patch_size=8, projection_dim=32, hidden_act="gelu")


def _text_encoder(out: Path, d_model: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    from omni_ray.testing.tiny_dit import _tokenizer

    eos = _tokenizer(out / "tokenizer", "t5", 512)
    cfg = UMT5Config(vocab_size=1024, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=eos, decoder_start_token_id=0)
    UMT5EncoderModel(cfg).save_pretrained(out / "text_encoder", safe_serialization=True)


def _image_encoder(out: Path) -> int:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).save_pretrained(out / "image_encoder",
                                                                         safe_serialization=True)
    size = TINY_CLIP_VISION["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       do_center_crop=True, do_convert_rgb=True).save_pretrained(out / "image_processor")
    return TINY_CLIP_VISION["hidden_size"]


def build_wan(out: Path, i2v: bool = False, two_experts: bool = False, seed: int = 0, ti2v: bool = False) -> None:
    """A tiny Wan directory: T2V (``WanPipeline``), I2V (``WanImageToVideoPipeline``, Wan2.1's CLIP
    image conditioning), ``two_experts``: Wan2.2's high/low-noise transformer pair, ``ti2v``: Wan2.2 TI2V-5B."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from omni_ray.testing.tiny_dit import _save, _write_index

    torch.manual_seed(seed)
    tr = dict(TINY_TI2V_TRANSFORMER if ti2v else TINY_TRANSFORMER)
    comps: dict = {"scheduler": ("diffusers", "UniPCMultistepScheduler"),
                   "text_encoder": ("transformers", "UMT5EncoderModel"),
                   "tokenizer": ("transformers", "PreTrainedTokenizerFast"),
                   "transformer": ("diffusers", "WanTransformer3DModel"),
                   "transformer_2": None,
                   "vae": ("diffusers", "AutoencoderKLWan")}
    _text_encoder(out, tr["text_dim"])
    if i2v:
        image_dim = _image_encoder(out)
        tr.update(in_channels=2 * TINY_VAE["z_dim"] + 4, image_dim=image_dim,
                  added_kv_proj_dim=tr["num_attention_heads"] * tr["attention_head_dim"])
        comps.update(image_encoder=("transformers", "CLIPVisionModel"),
                     image_processor=("transformers", "CLIPImageProcessor"))
    _save(WanTransformer3DModel(**tr), out / "transformer", torch.float32)
    if two_experts:
        _save(WanTransformer3DModel(**tr), out / "transformer_2", torch.float32)
        comps["transformer_2"] = ("diffusers", "WanTransformer3DModel")
    _save(AutoencoderKLWan(**(TINY_VAE22 if ti2v else TINY_VAE)), out / "vae", torch.float32)
    UniPCMultistepScheduler(**(WAN_SCHEDULER | ({"flow_shift": WAN22_TI2V_FLOW_SHIFT} if ti2v else {}))
                            ).save_pretrained(out / "scheduler")
    _write_index(out, "WanImageToVideoPipeline" if i2v else "WanPipeline", comps)
    import json
    index = json.loads((out / "model_index.json").read_text())
    index.update(boundary_ratio=WAN22_BOUNDARY_RATIO if two_experts else None, expand_timesteps=ti2v)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def builders() -> dict[str, Callable[[Path], None]]:
    return {
        "tiny:wan2.1-t2v": lambda p: build_wan(p),
        "tiny:wan2.1-i2v": lambda p: build_wan(p, i2v=True, seed=1),
        "tiny:wan2.2-t2v": lambda p: build_wan(p, two_experts=True, seed=2),
        "tiny:wan2.2-ti2v": lambda p: build_wan(p, ti2v=True, seed=3),
    }
