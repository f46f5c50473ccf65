"""Request rules declared once: each is checked in one place, with one message, and the HTTP
models read the same declarations for their OpenAPI bounds.

    TEMPERATURE = Rule("number", ge=0.0, le=2.0)
    TEMPERATURE.check("temperature", -1)   # InvalidRequestError("temperature must be a number in [0, 2], got -1")
    Field(1.0, json_schema_extra=TEMPERATURE.json_schema())        # minimum 0, maximum 2 in the document

The parameter tables are beside the parameters (``omni_ray.ar.sampling_params.SAMPLING_RULES``,
``omni_ray.dit.params.DIFFUSION_RULES``); the prompt rules shared by every stage kind are here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omni_ray.errors import InvalidRequestError


def _num(x: float) -> str:
    if x == 2**63:
        return "2**63"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


@dataclass(frozen=True)
class Rule:
    """A number (``kind`` "number" or "integer", never a bool, never NaN or infinite) within
    bounds, optionally a multiple of ``multiple_of``; ``optional``: None is allowed too."""

    kind: str = "number"
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    optional: bool = True
    note: str = ""                      # appended to the message, e.g. "(-1: off)"

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.optional
        if isinstance(v, bool) or not isinstance(v, (int, float) if self.kind == "number" else int):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt)
                and (self.multiple_of is None or v % self.multiple_of == 0))

    def check(self, name: str, v: Any) -> Any:
        if not self.ok(v):
            got = "NaN (not a number)" if isinstance(v, float) and math.isnan(v) else repr(v)
            raise InvalidRequestError(f"{name} must be {self.describe()}, got {got}", param=name)
        return v

    def describe(self) -> str:
        what = "a number" if self.kind == "number" else "an integer"
        lo = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None)
        hi = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            text = f"{what} in {lo}, {hi}"
        elif lo:
            text = f"{what} {'>=' if self.ge is not None else '>'} {lo[1:]}"
        elif hi:
            text = f"{what} {'<=' if self.le is not None else '<'} {hi[:-1]}"
        else:
            text = what
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        return text + (f" {self.note}" if self.note else "")

    def json_schema(self) -> dict:
        """The bounds as OpenAPI / JSON-schema keywords (documented there, checked by ``check``)."""
        out = {"minimum": self.ge, "exclusiveMinimum": self.gt, "maximum": self.le, "exclusiveMaximum": self.lt,
               "multipleOf": self.multiple_of}
        return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- prompts
def check_text(prompt: Any, param: str = "prompt") -> None:
    """A text prompt (a pipeline's, an image request's) is a non-empty string."""
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"{param} must be a string, got {type(prompt).__name__}", param=param)
    if not prompt:
        raise InvalidRequestError(f"{param} is empty", param=param)


def check_prompt(prompt: Any, param: str = "prompt") -> None:
    """An AR prompt is a non-empty string or a non-empty list of integer token ids (the vocabulary
    is the engine's to check)."""
    if isinstance(prompt, str):
        return check_text(prompt, param)
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InvalidRequestError(f"{param} must be a non-empty string or list of token ids", param=param)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise InvalidRequestError("token ids must be integers", param=param)


def check_prompt_tokens(n: int, limit: int | None, param: str = "prompt") -> None:
    """``app.limits.max_prompt_tokens``: of token-id prompts at the ingress, of text prompts right
    after the AR stage tokenized them."""
    if limit is not None and n > limit:
        raise InvalidRequestError(f"prompt has {n} tokens; the limit is {limit}", param=param)
