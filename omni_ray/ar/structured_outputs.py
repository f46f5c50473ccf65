"""What a request's output must match: vLLM's ``StructuredOutputsParams`` (exactly one of
``json``, ``json_object``, ``regex``, ``grammar``, ``choice``).

The grammar engine that enforces it (token masks per decoding step) is ``omni_ray.ar.grammar``;
this module is only the request's side, so that the HTTP layer, the stage requests and the
offline API can build one without importing the engine.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

from omni_ray.errors import InvalidRequestError

KINDS = ("json", "json_object", "regex", "grammar", "choice")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | dict | None = None            # a JSON schema (dict or its JSON text)
    json_object: bool = False                 # any JSON object
    regex: str | None = None
    grammar: str | None = None                # EBNF (GBNF / xgrammar's dialect)
    choice: tuple[str, ...] | None = None     # one of these strings
    param: str = "structured_outputs"         # the request field errors name (e.g. "response_format")

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError(f"{self.param}: exactly one of {', '.join(KINDS)} must be set, got "
                                      f"{set_ or 'none'}", param=self.param)
        if isinstance(self.json, str):
            try:
                _json.loads(self.json)
            except ValueError as e:
                raise InvalidRequestError(f"{self.param}: the JSON schema is not valid JSON ({e})",
                                          param=self.param) from None
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError(f"{self.param}: choice must be a non-empty list of non-empty strings",
                                      param=self.param)

    @classmethod
    def from_dict(cls, d: dict, param: str = "structured_outputs") -> StructuredOutputsParams:
        """From vLLM's dict shape (``{"json": schema}``, ``{"regex": ...}``, ``{"choice": [...]}``);
        an unknown key is an InvalidRequestError."""
        unknown = sorted(set(d) - set(KINDS))
        if unknown:
            raise InvalidRequestError(f"{param}: unknown key {unknown[0]!r}; expected one of {', '.join(KINDS)}",
                                      param=f"{param}.{unknown[0]}")
        return cls(**d, param=param)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def schema_text(self) -> str | None:
        """The JSON schema as text (None unless ``json`` is set)."""
        if self.json is None:
            return None
        return self.json if isinstance(self.json, str) else _json.dumps(self.json)

    def key(self) -> tuple[str, Any]:
        """A hashable key for the compiled-grammar cache."""
        value = getattr(self, self.kind)
        return self.kind, self.schema_text() if self.kind == "json" else value
