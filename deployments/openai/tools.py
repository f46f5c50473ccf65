"""Tool calling on chat completions, as OpenAI's API and vLLM's server define it: the request's
``tools`` / ``tool_choice`` / ``parallel_tool_calls`` and the tool-call history in ``messages``.

What each ``tool_choice`` does (the model's chat template renders ``tools`` unless it is "none"):

    "none"            no tools rendered, no parsing: plain text
    "auto"            the output is parsed by the stage's tool-call parser (``tool_call_parser`` in
                      the AR stage's config, default by model family): content and/or tool calls
    "required"        decoding is constrained to a JSON array of calls of the tools (vLLM's schema,
                      ``omni_ray.tool_parsers.forced.required_schema``), parsed into tool calls
    {"type": "function", "function": {"name": f}}
                      decoding is constrained to f's ``parameters`` schema; the output is f's arguments

``ToolCalling`` is a request's plan (render, constrain, parse); the response side
(``deployments/openai/responses.py``) turns parsed calls into ``message.tool_calls`` and streamed
``delta.tool_calls``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from omni_ray.ar.grammar.parse import to_grammar
from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.ar.structured_outputs import StructuredOutputsParams
from omni_ray.errors import InvalidRequestError
from omni_ray.tool_parsers import NamedParser, RequiredParser, ToolParser, get_parser, required_schema

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")        # OpenAI's rule for function names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None      # a JSON schema
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(_Strict):
    name: str
    arguments: str                                # JSON text, as the API returned it


class ToolCallIn(_Strict):
    """An assistant message's tool call in the history."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------------------- request checks
def check_tools(tools: list[ToolDefinition] | None, tool_choice: ToolChoice | None) -> None:
    """Names valid and distinct, parameters valid JSON schemas, a tool_choice that the tools allow."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    seen = set()
    for i, t in enumerate(tools or []):
        f = t.function
        if not _NAME.match(f.name):
            raise InvalidRequestError(f"function name {f.name!r} must be 1-64 letters, digits, '_' or '-'",
                                      param=f"tools.{i}.function.name")
        if f.name in seen:
            raise InvalidRequestError(f"two tools are named {f.name!r}", param=f"tools.{i}.function.name")
        seen.add(f.name)
        if f.parameters is not None:
            try:
                validator_for(f.parameters).check_schema(f.parameters)
            except SchemaError as e:
                raise InvalidRequestError(f"function {f.name!r}: parameters is not a valid JSON schema: {e.message}",
                                          param=f"tools.{i}.function.parameters") from None
    if isinstance(tool_choice, NamedToolChoice):
        if tool_choice.function.name not in seen:
            raise InvalidRequestError(f"tool_choice names function {tool_choice.function.name!r}, which is not in "
                                      f"tools ({sorted(seen) or 'none given'})", param="tool_choice")
    elif tool_choice == "required" and not seen:
        raise InvalidRequestError("tool_choice 'required' needs tools", param="tool_choice")


def history_message(i: int, role: str, content: str | list[dict], tool_calls: list[ToolCallIn] | None,
                    tool_call_id: str | None, name: str | None) -> dict:
    """One message for the chat template: an assistant's ``tool_calls`` with their arguments as
    objects (what the templates render, as vLLM passes them), a tool result with its call id."""
    out: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        if role != "assistant":
            raise InvalidRequestError(f"only assistant messages have tool_calls, not {role!r}",
                                      param=f"messages.{i}.tool_calls")
        calls = []
        for j, c in enumerate(tool_calls):
            try:
                args = json.loads(c.function.arguments)
            except ValueError as e:
                raise InvalidRequestError(f"tool call arguments are not valid JSON ({e})",
                                          param=f"messages.{i}.tool_calls.{j}.function.arguments") from None
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        out["tool_calls"] = calls
    if role == "tool":
        if not tool_call_id:
            raise InvalidRequestError("a tool message needs the tool_call_id of the call it answers",
                                      param=f"messages.{i}.tool_call_id")
        out["tool_call_id"] = tool_call_id
        if name:
            out["name"] = name
    return out


# ----------------------------------------------------------------------------- the constraint
def constraint_of(functions: list[dict], mode: str, function: str | None = None,
                  parallel: bool = True) -> StructuredOutputsParams | None:
    """What decoding must match under tool_choice ``mode`` (None: free text). ``functions``:
    OpenAI's ``tools[].function`` objects."""
    if mode == "named":
        f = next(f for f in functions if f["name"] == function)
        return StructuredOutputsParams(json=f.get("parameters") or {"type": "object"}, param="tool_choice")
    if mode == "required":
        return StructuredOutputsParams(json=required_schema(functions, parallel), param="tool_choice")
    return None


def constrain(params: SamplingParams, tools: list[ToolDefinition] | None, tool_choice: ToolChoice | None,
              parallel: bool | None) -> SamplingParams:
    """``params`` constrained as ``tool_choice`` required / named asks (else as they are); one
    constraint per request: with response_format's too, a 400."""
    mode = ("named" if isinstance(tool_choice, NamedToolChoice) else tool_choice) if tools else None
    if mode not in ("named", "required"):
        return params
    check_tools(tools, tool_choice)
    so = constraint_of([t.function.model_dump(exclude_none=True) for t in tools], mode,
                       tool_choice.function.name if mode == "named" else None, parallel is not False)
    if params.structured_outputs is not None:
        raise InvalidRequestError(f"tool_choice {mode!r} constrains the output to tool calls; it cannot be "
                                  "combined with response_format", param="tool_choice")
    to_grammar(so)                               # a schema xgrammar cannot follow: 400 here, not in the engine
    return dataclasses.replace(params, structured_outputs=so)


# ----------------------------------------------------------------------------- the plan
@dataclass
class ToolCalling:
    """A request's tool calling: the tools its template renders, the constraint of its decoding,
    and how its output is read (``stream()``: one parser per choice)."""

    mode: str                                    # "auto" | "required" | "named"
    tools: list[dict]                            # rendered by the chat template
    parser: str | None = None                    # auto: the stage's parser
    function: str | None = None                  # named: the function
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[ToolDefinition] | None, tool_choice: ToolChoice | None, parallel: bool | None,
           parser: str | None, model: str = "this model") -> ToolCalling | None:
        """The plan of a request (None: no tools, or tool_choice "none"). ``parser``: the stage's
        tool-call parser (None: it has none)."""
        check_tools(tools, tool_choice)
        choice = tool_choice or ("auto" if tools else "none")
        if not tools or choice == "none":
            return None
        rendered = [t.model_dump(exclude_none=True) for t in tools]
        par = parallel is not False
        if isinstance(choice, NamedToolChoice):
            return cls("named", rendered, function=choice.function.name, parallel=par)
        if choice == "required":
            return cls("required", rendered, parallel=par)
        if parser is None:
            raise InvalidRequestError(f"{model} has no tool-call parser for tool_choice 'auto' (set the AR stage's "
                                      "tool_call_parser); tool_choice 'required' or a named function work without "
                                      "one", param="tool_choice")
        get_parser(parser)
        return cls("auto", rendered, parser=parser, parallel=par)

    def constraint(self) -> StructuredOutputsParams | None:
        """What decoding must match (None: free text)."""
        return constraint_of([t["function"] for t in self.tools], self.mode, self.function, self.parallel)

    def stream(self, incremental: bool = True) -> ToolParser:
        if self.mode == "named":
            return NamedParser(self.function, incremental=incremental)
        if self.mode == "required":
            return RequiredParser(incremental=incremental)
        return get_parser(self.parser)(incremental=incremental)

    def finish_reason(self, reason: str | None, num_calls: int) -> str | None:
        """OpenAI's: "tool_calls" when the model chose to call (auto, required) and stopped by itself;
        a named function's call finishes as "stop", as OpenAI and vLLM answer."""
        if num_calls and reason == "stop" and self.mode != "named":
            return "tool_calls"
        return reason

    @property
    def max_calls(self) -> int | None:
        """parallel_tool_calls false: the first call only."""
        return None if self.parallel else 1
