"""Tool calls forced by ``tool_choice`` (vLLM's way): the output is constrained by a JSON schema,
so these parsers read JSON, never a model family's format.

* ``required``: the output is a JSON array of ``{"name": ..., "parameters": {...}}`` objects, each
  one of the tools (``required_schema``); ``RequiredParser`` turns it into calls.
* a named function: the output is that function's arguments (its ``parameters`` schema);
  ``NamedParser`` makes it one call of that function.
"""

from __future__ import annotations

from omni_ray.tool_parsers.base import ToolParser
from omni_ray.tool_parsers.json_calls import skip_ws
from omni_ray.tool_parsers.llama3_json import Llama3JsonParser

ANY_OBJECT = {"type": "object"}


def required_schema(functions: list[dict], parallel: bool = True) -> dict:
    """The JSON schema of ``tool_choice: "required"``'s output: a non-empty array of calls, each
    ``{"name": <one of the functions>, "parameters": <that function's schema>}`` (one call at most
    when ``parallel`` is false). ``functions``: OpenAI's ``tools[].function`` objects."""
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [f["name"]]},
                             "parameters": f.get("parameters") or ANY_OBJECT},
              "required": ["name", "parameters"], "additionalProperties": False}
             for f in functions]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class RequiredParser(Llama3JsonParser):
    """``[{"name": ..., "parameters": ...}, ...]`` -> calls (not a list of calls: content)."""

    name = "required"
    sep, close = ",", "]"

    def _begin(self, text: str) -> int | None:
        pos = skip_ws(text, 0)
        if pos >= len(text):
            return None
        return pos + 1 if text[pos] == "[" else -1


class NamedParser(ToolParser):
    """The whole output is the arguments of one call of ``function`` (even when cut short: the
    constraint leaves nothing else it could be)."""

    name = "named"

    def __init__(self, function: str, incremental: bool = True):
        super().__init__(incremental)
        self.function = function
        self._started = False
        self._pending = ""

    def _feed(self, delta: str) -> None:
        if not self.incremental:
            self._pending += delta
            return
        if not self._started:
            self._call(self.function)
            self._started = True
        self._args(0, delta)

    def _end(self) -> None:
        if not self._started:
            self._call(self.function)
        self._args(0, self._pending)
