"""Stages: typed requests (``requests``), the engine protocol every stage serves through
(``protocol``) and its adapters (``ar``: AsyncLLM, ``dit``: AsyncDiTEngine)."""

from omni_ray.stages.protocol import StageEngine
from omni_ray.stages.requests import ARRequest, DiTRequest, Handoff

__all__ = ["ARRequest", "DiTRequest", "Handoff", "StageEngine"]
