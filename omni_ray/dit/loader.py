"""Load a diffusers-format directory: ``model_index.json`` + one folder per component.

Models load with their library's ``from_pretrained`` from safetensors only: pickle weights
(.bin/.pt/.ckpt) are refused unless ``model.allow_pickle`` is set, and even then safetensors are
preferred where both exist and pickles are read with ``torch.load(weights_only=True)`` (by
diffusers / transformers). Classes come from the diffusers / transformers namespaces by name, and
tokenizers load with ``AutoTokenizer(trust_remote_code=False)``: no code shipped with a checkpoint
runs. Components listed as ``[null, null]`` come back as ``None`` (an LLM-conditioned model has no
text encoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from omni_ray.errors import ConfigError

_SKIP = {"feature_extractor", "image_encoder", "safety_checker"}


def read_model_index(path: Path) -> dict:
    f = path / "model_index.json"
    if not f.exists():
        raise ConfigError(f"{path} has no model_index.json (not a diffusers-format model directory)")
    return json.loads(f.read_text())


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    if any(folder.rglob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.ckpt")):
        if not allow_pickle:
            raise ConfigError(f"{folder} holds only pickle-based weights; convert them to safetensors "
                              "or set model.allow_pickle: true")
        return
    raise ConfigError(f"no weights in {folder}")


def load_component(path: Path, name: str, library: str, cls_name: str, device: torch.device,
                   dtype: torch.dtype, allow_pickle: bool = False):
    folder = path / name
    if not folder.is_dir():
        raise ConfigError(f"model_index.json lists {name!r} but {folder} does not exist")
    if "tokenizer" in name.lower() or cls_name.endswith("Tokenizer") or cls_name.endswith("TokenizerFast"):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if "scheduler" in name.lower() or cls_name.endswith("Scheduler"):
        import diffusers
        return getattr(diffusers, cls_name).from_pretrained(str(folder), local_files_only=True)
    _check_weights(folder, allow_pickle)
    # True: safetensors or nothing; None: safetensors where present, else the (allowed) pickle files
    use_safetensors = None if allow_pickle else True
    if library == "diffusers":
        import diffusers
        cls = getattr(diffusers, cls_name)
        model = cls.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=use_safetensors,
                                    local_files_only=True)
    elif library == "transformers":
        import transformers
        cls = getattr(transformers, cls_name)
        model = cls.from_pretrained(str(folder), dtype=dtype, use_safetensors=use_safetensors,
                                    local_files_only=True)
    else:
        raise ConfigError(f"component {name!r}: unsupported library {library!r}")
    return model.to(device).eval().requires_grad_(False)


def load_components(path: Path, device: torch.device, dtype: torch.dtype,
                    allow_pickle: bool = False, skip: frozenset | set = frozenset()) -> tuple[str, dict]:
    """Returns (pipeline class name, {component name: object or None}); components named in ``skip``
    (a family's text encoder that runs as a stage of its own) are not loaded and come back as None."""
    index = read_model_index(path)
    pipeline = index.get("_class_name", "")
    comps: dict = {}
    for name, spec in index.items():
        if name.startswith("_") or name in _SKIP:
            continue
        if not isinstance(spec, list) or len(spec) != 2:
            continue
        library, cls_name = spec
        comps[name] = None if library is None or name in skip else load_component(
            path, name, library, cls_name, device, dtype, allow_pickle)
    return pipeline, comps
