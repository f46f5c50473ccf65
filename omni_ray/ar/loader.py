"""Load HF-format checkpoints (config.json + safetensors, sharded or not) into the decoder.

Each rank reads only its slices (``safe_open(...).get_slice``). Pickle-based weights (.bin/.pt)
are refused unless the config allows them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from omni_ray.errors import ConfigError


def read_hf_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise ConfigError(f"{path} has no config.json (not an HF-format model directory)")
    return json.loads(f.read_text())


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        if not allow_pickle:
            raise ConfigError(f"{path} holds only pickle-based weights (.bin/.pt); convert them to "
                              "safetensors or set model.allow_pickle: true")
        raise ConfigError("pickle-based weights are allowed by config but not implemented; use safetensors")
    raise ConfigError(f"no *.safetensors weights in {path}")


class _TensorSource:
    """A loaded tensor that supports the slicing a safetensors slice does."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __getitem__(self, idx):
        return self.t[idx]


def load_weights(model: nn.Module, path: Path, allow_pickle: bool = False) -> set[str]:
    """Copy every checkpoint tensor into its (possibly packed, possibly sharded) parameter.
    Returns the names of parameters that were loaded; raises if one is missing."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    loaded: set[str] = set()
    for f in weight_files(path, allow_pickle):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                target, shard = _map_name(name, packed)
                if target not in params:
                    if "rotary_emb" in name or (target.startswith("lm_head") and "lm_head.weight" not in params):
                        continue
                    raise ConfigError(f"checkpoint tensor {name!r} has no place in the model")
                param = params[target]
                loader = getattr(param, "weight_loader", _copy_whole)
                src = st.get_slice(name)
                if shard is None:
                    loader(param, src)
                else:
                    loader(param, src, shard)
                loaded.add(target)
    missing = set(params) - loaded
    if getattr(model.config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
    if missing:
        raise ConfigError(f"checkpoint {path} lacks weights for {sorted(missing)[:5]}")
    return loaded


def _copy_whole(param: nn.Parameter, source, shard_id=None) -> None:
    param.data.copy_(source[:])


def _map_name(name: str, packed: dict) -> tuple[str, object]:
    name = name.removeprefix("model.")
    for ckpt, (ours, shard) in packed.items():
        if f".{ckpt}." in name:
            return name.replace(f".{ckpt}.", f".{ours}."), shard
    return name, None
