"""The request fields that ask for structured outputs, as OpenAI and vLLM name them, and the one
``StructuredOutputsParams`` they become (omni_ray/ar/structured_outputs.py):

* OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``
  (any JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}`` (output valid against ``schema``; enforced whatever ``strict`` says, as vLLM);
* vLLM's ``structured_outputs: {"json" | "regex" | "choice" | "grammar" | "json_object"}``;
* vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.

At most one of them per request (two: a 400 naming the second). The constraint's syntax (a JSON
schema xgrammar cannot follow, a bad regex or EBNF grammar) is checked here, at the ingress: a
400 naming the field, before the request is admitted or reaches an engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omni_ray.ar.grammar.parse import to_grammar
from omni_ray.ar.structured_outputs import StructuredOutputsParams
from omni_ray.errors import InvalidRequestError


class _Strict(BaseModel):
    """Unknown keys are a 400: a constraint option this server does not know is never dropped."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, protected_namespaces=())


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(_Strict):
    """vLLM's ``structured_outputs`` request field (exactly one key set)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def from_response_format(rf: ResponseFormat) -> StructuredOutputsParams | None:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutputsParams(json_object=True, param="response_format")
    if rf.json_schema is None:
        raise InvalidRequestError("response_format.json_schema is required when type is 'json_schema'",
                                  param="response_format.json_schema")
    return StructuredOutputsParams(json=rf.json_schema.schema_, param="response_format")


def from_structured_outputs(so: StructuredOutputsBody) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=so.json_, regex=so.regex, grammar=so.grammar, json_object=bool(so.json_object),
                                   choice=tuple(so.choice) if so.choice is not None else None,
                                   param="structured_outputs")


GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_of(body) -> StructuredOutputsParams | None:
    """The constraint a request body asks for (``response_format``, ``structured_outputs`` or one
    ``guided_*`` field), its syntax checked; None without one."""
    found: list[StructuredOutputsParams] = []
    if body.response_format is not None and (so := from_response_format(body.response_format)) is not None:
        found.append(so)
    if body.structured_outputs is not None:
        found.append(from_structured_outputs(body.structured_outputs))
    for name, kind in GUIDED.items():
        value = getattr(body, name)
        if value is not None:
            found.append(StructuredOutputsParams(**{kind: tuple(value) if kind == "choice" else value}, param=name))
    if len(found) > 1:
        raise InvalidRequestError(f"{found[1].param}: give one of response_format, structured_outputs and the "
                                  f"guided_* fields (this request also has {found[0].param})", param=found[1].param)
    if not found:
        return None
    to_grammar(found[0])                      # raises InvalidRequestError naming the field
    return found[0]
