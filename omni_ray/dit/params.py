"""Per-request diffusion parameters, step-cache settings and the events a request streams.

``DiffusionParams`` checks what it can alone (types, ranges, cache method); the engine checks
the rest against the model and its config (stride, pixel limit, max steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from omni_ray.errors import InvalidRequestError

CACHE_METHODS = ("fbcache", "teacache")
DEFAULT_THRESHOLDS = {"fbcache": 0.08, "teacache": 0.3}


def _bad(param: str, msg: str):
    raise InvalidRequestError(f"{param} {msg}", param=param)


@dataclass(frozen=True)
class StepCacheParams:
    """Reuse transformer work between denoising steps.

    fbcache:  run the first block; if its residual changed less than ``threshold`` (relative L1)
              since the last full step, add the remaining blocks' cached residual instead of
              running them.
    teacache: accumulate the relative L1 change of the first block's timestep-modulated input;
              while the sum stays under ``threshold`` skip every block (add the cached residual).
    The first and the last step always run in full.
    """

    method: Literal["fbcache", "teacache"]
    threshold: float

    @classmethod
    def parse(cls, spec: Any) -> "StepCacheParams | None":
        """``None`` / ``"off"`` / ``"fbcache"`` / ``{"method": ..., "threshold": ...}`` / an instance."""
        if spec is None or spec == "off" or spec is False:
            return None
        if isinstance(spec, cls):
            method, threshold = spec.method, spec.threshold
        elif isinstance(spec, str):
            method, threshold = spec, DEFAULT_THRESHOLDS.get(spec, 0.0)
        elif isinstance(spec, dict):
            unknown = set(spec) - {"method", "threshold"}
            if unknown:
                _bad("cache", f"has unknown keys {sorted(unknown)}; expected 'method' and 'threshold'")
            method = spec.get("method")
            if method in (None, "off"):
                return None
            threshold = spec.get("threshold", DEFAULT_THRESHOLDS.get(method, 0.0))
        else:
            _bad("cache", f"must be None, 'off', a method name or {{'method', 'threshold'}}, got {spec!r}")
        if method not in CACHE_METHODS:
            _bad("cache.method", f"must be 'off' or one of {list(CACHE_METHODS)}, got {method!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 10.0:
            _bad("cache.threshold", f"must be a number in (0, 10], got {threshold!r}")
        return cls(method, float(threshold))


@dataclass
class DiffusionParams:
    """What to generate. ``None`` fields take the model family's defaults."""

    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None      # <= 1: no classifier-free guidance
    seed: int | None = None                  # None: a random seed
    negative_prompt: str | None = None
    num_images_per_prompt: int = 1
    cache: Any = None                        # None | "off" | "fbcache" | {"method", "threshold"} | StepCacheParams
    step_cache: StepCacheParams | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                _bad(name, f"must be a positive integer, got {v!r}")
        n = self.num_inference_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            _bad("num_inference_steps", f"must be an integer >= 1, got {n!r}")
        g = self.guidance_scale
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0.0
                              or g == float("inf")):
            _bad("guidance_scale", f"must be a finite number >= 0, got {g!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63):
            _bad("seed", f"must be a non-negative integer, got {s!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            _bad("negative_prompt", f"must be a string, got {type(self.negative_prompt).__name__}")
        k = self.num_images_per_prompt
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            _bad("num_images_per_prompt", f"must be an integer >= 1, got {k!r}")
        self.step_cache = StepCacheParams.parse(self.cache)


@dataclass
class DiTEvent:
    """What ``AsyncDiTEngine.generate`` yields: ``progress`` after each denoising step
    (``step`` of ``total`` done), then one ``done`` with the images."""

    kind: Literal["progress", "done"]
    step: int = 0
    total: int = 0
    images: list | None = None
    request_id: str | None = None
    stats: dict | None = None          # on "done": per-request counters (block evals, cache skips, seed)
