"""Per-request diffusion parameters, step-cache settings and the events a request streams.

``DiffusionParams`` checks what it can alone (types, ranges, cache method); the engine checks
the rest against the model and its config (stride, pixel limit, max steps).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from omni_ray.errors import InvalidRequestError
from omni_ray.rules import Rule

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


DIFFUSION_RULES: dict[str, Rule] = {
    "height": Rule("integer", ge=8, multiple_of=8),
    "width": Rule("integer", ge=8, multiple_of=8),
    "num_inference_steps": Rule("integer", ge=1),
    "guidance_scale": Rule("number", ge=0.0, note="(<= 1: no classifier-free guidance)"),
    "seed": Rule("integer", ge=0, lt=2**63),
    "num_images_per_prompt": Rule("integer", ge=1, optional=False),
    "num_frames": Rule("integer", ge=1, note="(video models; None: the model's default)"),
}
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (height, width); None or "auto" -> (None, None): the model's default."""
    if size is None or size == "auto":
        return None, None
    m = _SIZE.match(size) if isinstance(size, str) else None
    if not m:
        _bad("size", f"must look like '512x512' (WxH), got {size!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if not (DIFFUSION_RULES["width"].ok(w) and DIFFUSION_RULES["height"].ok(h)):
        _bad("size", f"{size!r}: width and height must be multiples of 8, >= 8")
    return h, w


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
    num_frames: int | None = None            # video models: frames per video (Wan: 4k + 1)
    step_cache: StepCacheParams | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name, rule in DIFFUSION_RULES.items():
            rule.check(name, getattr(self, name))
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            _bad("negative_prompt", f"must be a string, got {type(self.negative_prompt).__name__}")
        self.step_cache = StepCacheParams.parse(self.cache)

    def key_fields(self) -> dict:
        """The request's fields as plain JSON values (the DiT cache keys images by them)."""
        c = self.step_cache
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "cache"} | {
            "cache": None if c is None else {"method": c.method, "threshold": c.threshold}}


DIFFUSION_KEYS = frozenset(f.name for f in fields(DiffusionParams) if f.init)


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
