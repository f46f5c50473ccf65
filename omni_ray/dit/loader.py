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

import importlib.util
import json
from pathlib import Path

import torch

from omni_ray.errors import ConfigError

_SKIP = {"feature_extractor", "image_encoder", "safety_checker"}
_PROCESSOR_SUFFIXES = ("ImageProcessor", "FeatureExtractor", "Processor")


def read_model_index(path: Path) -> dict:
    f = path / "model_index.json"
    if not f.exists():
        raise ConfigError(f"{path} has no model_index.json (not a diffusers-format model directory)")
    return json.loads(f.read_text())


def hf_architectures(path: Path) -> list[str]:
    """config.json's ``architectures`` of a transformers checkpoint directory ([] without one)."""
    f = path / "config.json"
    if not f.exists():
        return []
    archs = json.loads(f.read_text()).get("architectures") or []
    return [a for a in archs if isinstance(a, str)]


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
    if cls_name.endswith(_PROCESSOR_SUFFIXES):             # no weights: an image processor's config
        import transformers
        return getattr(transformers, cls_name).from_pretrained(str(folder), local_files_only=True)
    _check_weights(folder, allow_pickle)
    # True: safetensors or nothing; None: safetensors where present, else the (allowed) pickle files
    use_safetensors = None if allow_pickle else True
    if library == "diffusers":
        import diffusers
        cls = getattr(diffusers, cls_name)
        if getattr(cls, "_keep_in_fp32_modules", None) and importlib.util.find_spec("accelerate") is None:
            model = _load_keeping_fp32(cls, folder, dtype, use_safetensors)
        else:
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


def _load_keeping_fp32(cls, folder: Path, dtype: torch.dtype, use_safetensors):
    """``from_pretrained`` of a model whose class keeps some modules in float32 (Wan: norms, time
    embedder, modulation tables), without accelerate (which diffusers needs for that): load it in
    ``dtype`` through a subclass without the list, then read those modules' tensors again from the
    safetensors files in float32, as diffusers does."""
    from safetensors import safe_open

    keep = list(cls._keep_in_fp32_modules)
    plain = type(cls.__name__, (cls,), {"_keep_in_fp32_modules": None})
    model = plain.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=use_safetensors,
                                  local_files_only=True)
    if dtype == torch.float32:
        return model
    params = dict(model.named_parameters())
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                if k in params and any(m in k.split(".") for m in keep):
                    params[k].data = sf.get_tensor(k).float()
    return model


def load_components(path: Path, device: torch.device, dtype: torch.dtype,
                    allow_pickle: bool = False, skip: frozenset | set = frozenset(),
                    keep: frozenset | set = frozenset()) -> tuple[str, dict]:
    """Returns (pipeline class name, {component name: object or None}); components named in ``skip``
    (a family's text encoder that runs as a stage of its own) are not loaded and come back as None.
    ``keep``: components loaded although most families skip them (``image_encoder`` for Wan I2V)."""
    index = read_model_index(path)
    pipeline = index.get("_class_name", "")
    comps: dict = {}
    for name, spec in index.items():
        if name.startswith("_") or (name in _SKIP and name not in keep):
            continue
        if not isinstance(spec, list) or len(spec) != 2:
            comps[name] = spec                  # a pipeline setting (Wan2.2: boundary_ratio)
            continue
        library, cls_name = spec
        comps[name] = None if library is None or name in skip else load_component(
            path, name, library, cls_name, device, dtype, allow_pickle)
    return pipeline, comps
