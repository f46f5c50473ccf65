"""architecture name -> a function of the checkpoint's config that returns its StageGraph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from omni_ray.errors import ConfigError
from omni_ray.graphs.graph import StageGraph

GraphFn = Callable[[dict], StageGraph]       # the checkpoint's config.json / model_index.json -> graph
_REGISTRY: dict[str, GraphFn] = {}


def register(*architectures: str) -> Callable[[GraphFn], GraphFn]:
    def add(fn: GraphFn) -> GraphFn:
        for a in architectures:
            if a in _REGISTRY:
                raise ValueError(f"stage graph for {a} registered twice")
            _REGISTRY[a] = fn
        return fn
    return add


def registered() -> list[str]:
    return sorted(_REGISTRY)


def read_checkpoint_config(path: Path) -> tuple[str, dict]:
    """(architecture, config) of a checkpoint directory: model_index.json (diffusers) first, then
    config.json (transformers)."""
    for name, key in (("model_index.json", "_class_name"), ("config.json", "architectures")):
        f = path / name
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(f"{f}: not readable JSON ({err})") from None
            arch = cfg.get(key)
            arch = arch[0] if isinstance(arch, list) and arch else arch
            if not isinstance(arch, str) or not arch:
                raise ConfigError(f"{f}: no {key} naming the model's class")
            return arch, cfg
    raise ConfigError(f"{path}: neither model_index.json nor config.json (not an HF / diffusers directory)")


def architecture_of(model: str | Path) -> str:
    return read_checkpoint_config(_resolve(model))[0]


def graph_for(model: str | Path) -> StageGraph:
    """The stage graph of a checkpoint (a directory, or a ``tiny:`` / ``shape:`` name)."""
    path = _resolve(model)
    arch, cfg = read_checkpoint_config(path)
    if arch not in _REGISTRY:
        raise ConfigError(f"{path}: {arch} has no stage graph; omni-ray runs {registered()}")
    return _REGISTRY[arch](cfg)


def _resolve(model: str | Path) -> Path:
    from omni_ray.testing import resolve_model

    return resolve_model(model)
