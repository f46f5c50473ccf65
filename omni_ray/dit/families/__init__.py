"""DiT families: one adapter file each, picked by model_index.json's pipeline class.

Adding a family = one module with a ``DiTFamily`` subclass, listed in ``FAMILIES``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from omni_ray.dit.families.base import BlockState, Cond, DiTFamily
from omni_ray.dit.families.pixart import PixArtFamily
from omni_ray.dit.families.qwen2_5_omni_token2wav import Qwen2_5OmniToken2WavFamily
from omni_ray.dit.families.qwen_image import QwenImageEditFamily, QwenImageFamily
from omni_ray.dit.families.sd3 import SD3Family
from omni_ray.dit.families.wan import WanFamily, WanI2VFamily
from omni_ray.dit.families.wan_ti2v import WanTI2VFamily
from omni_ray.errors import ConfigError

FAMILIES: dict[str, type[DiTFamily]] = {f.pipeline_class: f for f in (PixArtFamily, SD3Family, QwenImageFamily,
                                                                  QwenImageEditFamily, WanFamily, WanI2VFamily)}

# transformers checkpoints (config.json ``architectures``, no model_index.json) whose part runs on the DiT engine
HF_FAMILIES: dict[str, type[DiTFamily]] = {Qwen2_5OmniToken2WavFamily.pipeline_class: Qwen2_5OmniToken2WavFamily}


def load_family(path: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int | None = None,
                allow_pickle: bool = False) -> DiTFamily:
    from omni_ray.dit.loader import hf_architectures, load_components, read_model_index

    if not (path / "model_index.json").exists():
        for arch in hf_architectures(path):
            if arch in HF_FAMILIES:
                return HF_FAMILIES[arch].load(path, device, dtype, max_sequence_length)
    index = read_model_index(path)
    pipeline = index.get("_class_name", "")
    if pipeline not in FAMILIES:
        raise ConfigError(f"{path}: pipeline {pipeline!r} is not supported; omni-ray runs {sorted(FAMILIES)}")
    fam = family_class(pipeline, index)
    _, comps = load_components(path, device, dtype, allow_pickle, fam.skip_components, keep=fam.extra_components)
    return fam(comps, device, dtype, max_sequence_length)


def family_class(pipeline: str, settings: dict) -> type[DiTFamily]:
    """The family that runs ``pipeline`` with these model_index.json settings (or components that carry
    them): Wan's ``WanPipeline`` with ``expand_timesteps`` is Wan2.2 TI2V."""
    fam = FAMILIES[pipeline]
    if settings.get("expand_timesteps") and issubclass(fam, WanFamily):    # per-token timesteps
        return WanTI2VFamily
    return fam


__all__ = ["FAMILIES", "HF_FAMILIES", "BlockState", "Cond", "DiTFamily", "PixArtFamily", "Qwen2_5OmniToken2WavFamily",
           "QwenImageEditFamily", "QwenImageFamily", "SD3Family", "WanFamily", "WanI2VFamily", "WanTI2VFamily",
           "family_class", "load_family"]
