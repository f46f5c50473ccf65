"""Tool-call parsers: a model's generated text -> content and tool calls (OpenAI's
``message.tool_calls``, streamed as ``delta.tool_calls``), one file per format, as vLLM's
``--tool-call-parser``:

    hermes        <tool_call>{"name": ..., "arguments": {...}}</tool_call> ...  (Qwen2.5, Qwen3, Hermes)
    llama3_json   {"name": ..., "parameters": {...}}; ...                      (Llama 3.1 / 3.2 / 3.3)

An AR stage's ``tool_call_parser`` names one (config: ``stages.<key>.tool_call_parser``); ``auto``
picks it from the checkpoint's architecture (``default_parser``). ``tool_choice: "required"`` and a
named function are parsed by ``forced.py`` whatever the family (the output is constrained JSON).

    parser = get_parser("hermes")()          # a stream: feed(delta) -> events, end() -> events
    get_parser("hermes").parse(text)         # Parsed(content, calls)
"""

from __future__ import annotations

from omni_ray.errors import ConfigError
from omni_ray.tool_parsers.base import CallArgs, CallStart, Content, Event, Parsed, ToolCall, ToolParser, collect
from omni_ray.tool_parsers.forced import NamedParser, RequiredParser, required_schema
from omni_ray.tool_parsers.hermes import HermesParser
from omni_ray.tool_parsers.llama3_json import Llama3JsonParser

PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}

# a checkpoint's config.json ``architectures[0]`` -> the format its chat template teaches
BY_ARCHITECTURE = {
    "Qwen2ForCausalLM": "hermes",
    "Qwen3ForCausalLM": "hermes",
    "Qwen2_5_VLForConditionalGeneration": "hermes",
    "Qwen2_5OmniForConditionalGeneration": "hermes",
    "Qwen2_5OmniThinkerForConditionalGeneration": "hermes",
    "LlamaForCausalLM": "llama3_json",
}


def get_parser(name: str) -> type[ToolParser]:
    if name not in PARSERS:
        raise ConfigError(f"unknown tool_call_parser {name!r}; choose from {sorted(PARSERS)}")
    return PARSERS[name]


def default_parser(architecture: str) -> str | None:
    """The parser of a model family (None: omni-ray knows no tool-call format for it)."""
    return BY_ARCHITECTURE.get(architecture)


__all__ = ["PARSERS", "BY_ARCHITECTURE", "get_parser", "default_parser", "ToolParser", "ToolCall", "Parsed",
           "Event", "Content", "CallStart", "CallArgs", "collect", "HermesParser", "Llama3JsonParser",
           "RequiredParser", "NamedParser", "required_schema"]
