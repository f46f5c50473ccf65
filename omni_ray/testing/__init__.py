"""Locally generated checkpoints: ``resolve_model("tiny:qwen3")`` returns an HF-format
directory, building it (random weights, seeded) the first time and caching it on disk.

Cache root: ``$OMNI_RAY_CACHE_DIR`` or ``~/.cache/omni_ray``. Anything that is not
``tiny:<name>`` / ``shape:<name>`` is taken as a path to an existing directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from omni_ray.errors import ConfigError

BUILDER_VERSION = "3"       # 2: shape checkpoints' tokenizers cover the whole vocabulary; 3: real chat templates


def cache_root() -> Path:
    return Path(os.environ.get("OMNI_RAY_CACHE_DIR", Path.home() / ".cache" / "omni_ray"))


def _builders() -> dict[str, Callable[[Path], None]]:
    from omni_ray.testing import tiny_ar, tiny_mm

    out: dict[str, Callable[[Path], None]] = {}
    for name in tiny_ar.TINY_AR:
        out[f"tiny:{name}"] = lambda p, n=name: tiny_ar.build_ar(p, n)
    for name, build in tiny_mm.TINY_MM.items():  # multimodal: Qwen2.5-VL, Qwen2.5-Omni
        out[f"tiny:{name}"] = build
    for name, build in tiny_mm.MM_SHAPES.items():
        out[f"shape:{name}"] = build
    for name in tiny_ar.SHAPES:  # real sizes: bf16, built on the GPU when there is one
        out[f"shape:{name}"] = lambda p, n=name: tiny_ar.build_ar(p, n, dtype=torch.bfloat16, device=_fast_device())
    try:  # DiT families register themselves in tiny_dit
        from omni_ray.testing import tiny_dit, tiny_qwen_image, tiny_wan
        out.update(tiny_dit.builders())
        out.update(tiny_qwen_image.builders())
        out.update(tiny_wan.builders())
    except ImportError:
        pass
    return out


def _fast_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _version(spec: str) -> str:
    """The builder version in a checkpoint's cache key (multimodal checkpoints add their own)."""
    from omni_ray.testing import tiny_mm

    if spec.removeprefix("tiny:") in tiny_mm.TINY_MM:
        return f"{BUILDER_VERSION}+mm{tiny_mm.VERSION}"
    return BUILDER_VERSION


def available() -> list[str]:
    return sorted(_builders())


def resolve_model(spec: str | os.PathLike) -> Path:
    """Return a local directory for ``spec``, generating ``tiny:``/``shape:`` checkpoints."""
    spec = str(spec)
    if not (spec.startswith("tiny:") or spec.startswith("shape:")):
        p = Path(spec).expanduser()
        if not p.is_dir():
            raise ConfigError(f"model path {spec!r} is not a directory (omni-ray downloads nothing; "
                              f"use a local HF-format directory or one of {available()})")
        return p
    builders = _builders()
    if spec not in builders:
        raise ConfigError(f"unknown built-in model {spec!r}; choose from {available()}")
    key = hashlib.sha1(f"{spec}:{_version(spec)}".encode()).hexdigest()[:8]
    dest = cache_root() / "models" / f"{spec.replace(':', '-')}-{key}"
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:  # one builder across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ".complete").exists():
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".build-"))
            try:
                builders[spec](tmp)
                (tmp / ".complete").write_text(spec)
                if dest.exists():
                    shutil.rmtree(dest)
                tmp.rename(dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return dest
