"""The seam between the AR engine and where its model runs, chosen from the config.

``make_executor(config, ...)`` gives the engine its ``runner``: the single-process ``ModelRunner``,
or, with ``parallel.tensor_parallel_size > 1``, the ``TPModelRunner`` that drives a group of Ray
worker ranks (``tensor_parallel.py``; the only module of the AR engine that reaches Ray).
"""

from __future__ import annotations

from pathlib import Path

from omni_ray.ar.models import ArchConfig
from omni_ray.ar.worker.model_runner import ModelRunner
from omni_ray.config import AREngineConfig


def make_executor(config: AREngineConfig, model_path: Path, arch: ArchConfig) -> ModelRunner:
    """The runner for ``config``: same interface (``run``, ``num_blocks``, ``device``, ...) either way."""
    if config.parallel.tensor_parallel_size > 1:
        from omni_ray.ar.executor.tensor_parallel import TPModelRunner  # Ray only when asked for
        return TPModelRunner(config, model_path, arch)
    return ModelRunner(config, model_path, arch)
