"""Load HF-format checkpoints (config.json + safetensors, sharded or not) into the decoder.

Each rank reads only its slices (``safe_open(...).get_slice``). Pickle-based weights (.bin/.pt)
are refused unless the config allows them (``model.allow_pickle``); even then they are read with
``torch.load(weights_only=True)``, which loads tensors and plain containers, never arbitrary objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
    pickled = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if pickled:
        if not allow_pickle:
            raise ConfigError(f"{path} holds only pickle-based weights (.bin/.pt); convert them to "
                              "safetensors or set model.allow_pickle: true")
        return pickled
    raise ConfigError(f"no *.safetensors weights in {path}")


@dataclass
class ReadStats:
    """What one rank read from the checkpoint: bytes, and the shape of each read per tensor."""
    bytes_read: int = 0
    checkpoint_bytes: int = 0                 # every tensor of the files, whole
    reads: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)


class _CountingSlice:
    """A safetensors slice that records what is read through it (tensor-parallel ranks read
    only their rows/columns; tests check that through these counts)."""

    def __init__(self, src, name: str, stats: ReadStats):
        self.src, self.name, self.stats = src, name, stats

    def __getitem__(self, idx):
        t = self.src[idx]
        self.stats.bytes_read += t.numel() * t.element_size()
        self.stats.reads.setdefault(self.name, []).append(tuple(t.shape))
        return t

    def __getattr__(self, attr):
        return getattr(self.src, attr)


class _PickleCheckpoint:
    """A .bin/.pt state dict behind safe_open's interface (keys, get_slice), loaded with
    ``weights_only=True``: a file that needs anything but tensors and containers is refused."""

    def __init__(self, f: Path):
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling refused or a corrupt file
            raise ConfigError(f"{f}: not a plain tensor checkpoint ({type(err).__name__}: {err})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConfigError(f"{f}: expected a state dict of tensors")
        self.sd = sd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sd = {}

    def keys(self):
        return list(self.sd)

    def get_slice(self, name: str):
        return _PickleSlice(self.sd[name])


class _PickleSlice:
    """A tensor of a pickle checkpoint, sliced like a safetensors slice."""

    _DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __getitem__(self, idx):
        return self.t[idx]

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def get_dtype(self) -> str:
        return self._DTYPES.get(self.t.dtype, "U8")


def _open(f: Path):
    if f.suffix == ".safetensors":
        return safe_open(str(f), framework="pt", device="cpu")
    return _PickleCheckpoint(f)


class _TensorSource:
    """A loaded tensor that supports the slicing a safetensors slice does."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __getitem__(self, idx):
        return self.t[idx]


def load_weights(model: nn.Module, path: Path, allow_pickle: bool = False, stats: ReadStats | None = None) -> set[str]:
    """Copy every checkpoint tensor into its (possibly packed, possibly sharded) parameter.
    Returns the names of parameters that were loaded; raises if one is missing. ``stats``
    (optional) records the bytes and shapes read."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    prefixes = getattr(model.config, "weight_prefixes", (("model.", ""),))
    ignored = getattr(model.config, "ignored_prefixes", ())
    loaded: set[str] = set()
    for f in weight_files(path, allow_pickle):
        with _open(f) as st:
            for name in st.keys():
                if name.startswith(ignored):            # encoders, talker, token2wav: not this model's
                    continue
                target, shard = _map_name(name, packed, prefixes)
                if target not in params:
                    if "rotary_emb" in name or (target.startswith("lm_head") and "lm_head.weight" not in params):
                        continue
                    raise ConfigError(f"checkpoint tensor {name!r} has no place in the model")
                param = params[target]
                loader = getattr(param, "weight_loader", _copy_whole)
                src = st.get_slice(name)
                if stats is not None:
                    shape = src.get_shape()
                    stats.checkpoint_bytes += _numel(shape) * _itemsize(src.get_dtype())
                    src = _CountingSlice(src, name, stats)
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


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)


def _copy_whole(param: nn.Parameter, source, shard_id=None) -> None:
    param.data.copy_(source[:])


def _map_name(name: str, packed: dict, prefixes=(("model.", ""),)) -> tuple[str, object]:
    """Checkpoint tensor name -> (our parameter name, shard id): the first matching prefix of
    ``prefixes`` (checkpoint prefix, ours) replaced, then q/k/v and gate/up mapped to the packed
    parameters."""
    for ckpt, ours in prefixes:
        if name.startswith(ckpt):
            name = ours + name[len(ckpt):]
            break
    for ckpt, (ours, shard) in packed.items():
        if f".{ckpt}." in name:
            return name.replace(f".{ckpt}.", f".{ours}."), shard
    return name, None
