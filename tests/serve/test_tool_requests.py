"""Tool calling on chat completions without Ray: the request's tool fields and their errors, the
plan (render, constrain, parse), and the response bodies and stream chunks it gives."""

import asyncio
import json

import pytest
from pydantic import ValidationError

from deployments.ingress.catalog import Catalog
from deployments.ingress.text import render_text
from deployments.openai.protocol import ChatCompletionRequest
from deployments.openai.responses import Chat, Choice
from deployments.openai.tool_calls import ToolChat
from omni_ray.ar.structured_outputs import StructuredOutputsParams
from omni_ray.config import OmniConfig, validate
from omni_ray.errors import InvalidRequestError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def body(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER} | kw)


def plan(parser="hermes", **kw):
    return body(**kw).tool_calling(parser, "tiny-qwen3")


def error(fn) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        fn()
    return e.value


# ----------------------------------------------------------------------------- request side
def test_tool_choice_modes():
    assert plan() is None and plan(tools=[WEATHER], tool_choice="none") is None
    auto = plan(tools=[WEATHER, TIME])
    assert auto.mode == "auto" and auto.parser == "hermes" and auto.constraint() is None
    assert auto.tools == [WEATHER, TIME]                       # rendered as given
    req = plan(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    so = req.constraint()
    assert isinstance(so, StructuredOutputsParams) and so.param == "tool_choice"
    assert so.json["type"] == "array" and so.json["maxItems"] == 1
    assert [c["properties"]["name"]["enum"] for c in so.json["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    named = plan(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.mode == "named" and named.constraint().json == WEATHER["function"]["parameters"]


@pytest.mark.parametrize("kw,param", [
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}), "tool_choice"),
    (dict(tools=[WEATHER, WEATHER]), "tools.1.function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools.0.function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]),
     "tools.0.function.parameters"),
])
def test_tool_errors_name_the_field(kw, param):
    assert error(lambda: plan(**kw)).param == param


def test_auto_needs_a_parser_but_forced_choices_do_not():
    e = error(lambda: plan(parser=None, tools=[WEATHER]))
    assert e.param == "tool_choice" and "tool_call_parser" in e.message
    assert plan(parser=None, tools=[WEATHER], tool_choice="required").mode == "required"


def test_tool_fields_are_typed():
    for bad in ({"tools": [{"type": "retrieval"}]}, {"tool_choice": "sometimes"}, {"tools": "get_weather"},
                {"parallel_tool_calls": "yes"}):
        with pytest.raises(ValidationError):
            body(**bad)


def test_history_with_tool_calls_and_results():
    b = body(messages=USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    msgs = b.chat_messages()
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize("msg,param", [
    ({"role": "tool", "content": "sunny"}, "messages.1.tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
     "messages.1.tool_calls"),
])
def test_history_errors_name_the_field(msg, param):
    assert error(lambda: body(messages=USER + [msg]).chat_messages()).param == param


def test_constraint_and_response_format_do_not_mix():
    kw = dict(tools=[WEATHER], tool_choice="required")
    assert body(**kw).to_sampling_params().structured_outputs == plan(**kw).constraint()
    assert body(tools=[WEATHER]).to_sampling_params().structured_outputs is None          # auto: free
    e = error(lambda: body(**kw, response_format={"type": "json_object"}).to_sampling_params())
    assert e.param == "tool_choice"


def test_catalog_parser_from_config_and_family():
    from tests.serve.conftest import app_config

    cfg = validate(OmniConfig, app_config())
    assert Catalog(cfg).tool_parser("llm") == "hermes"                 # tiny:qwen3 -> Qwen3ForCausalLM
    raw = app_config()
    raw["stages"]["llm"]["engine"]["model"]["path"] = "tiny:llama"
    assert Catalog(validate(OmniConfig, raw)).tool_parser("llm") == "llama3_json"
    raw["stages"]["llm"]["tool_call_parser"] = "none"
    assert Catalog(validate(OmniConfig, raw)).tool_parser("llm") is None
    raw["stages"]["llm"]["tool_call_parser"] = "mistral"
    with pytest.raises(Exception, match="tool_call_parser"):
        validate(OmniConfig, raw)


def test_config_choices_are_the_registered_parsers():
    from typing import get_args

    from omni_ray.config import ARStageConfig
    from omni_ray.tool_parsers import PARSERS

    choices = set(get_args(ARStageConfig.model_fields["tool_call_parser"].annotation))
    assert choices == set(PARSERS) | {"auto", "none"}


# ----------------------------------------------------------------------------- response side
def delta(text, finished=False, reason=None):
    return {"text": text, "token_ids": [1], "finished": finished, "finish_reason": reason,
            "num_prompt_tokens": 5, "num_output_tokens": 1}


def choice(text, reason="stop") -> Choice:
    c = Choice(0)
    c.add(delta(text, True, reason))
    return c


TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_body_with_tool_calls():
    fmt = ToolChat(Chat("chatcmpl-1", "tiny-qwen3", False), plan(tools=[WEATHER]))
    out = fmt.body([choice(TEXT)], {})["choices"][0]
    assert out["finish_reason"] == "tool_calls"
    msg = out["message"]
    assert msg["content"] == "Checking."
    [call] = msg["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    plain = fmt.body([choice("No tools needed.", "length")], {})["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "No tools needed."}
    assert plain["finish_reason"] == "length"


def test_body_of_forced_choices():
    named = ToolChat(Chat("x", "m", False), plan(tools=[WEATHER], tool_choice={"type": "function",
                                                                    "function": {"name": "get_weather"}}))
    out = named.body([choice('{"city": "Rome"}')], {})["choices"][0]
    assert out["message"]["content"] is None and out["finish_reason"] == "stop"       # as OpenAI / vLLM
    assert out["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    req = ToolChat(Chat("x", "m", False), plan(tools=[WEATHER, TIME], tool_choice="required"))
    out = req.body([choice('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", '
                           '"parameters": {"city": "Oslo"}}]')], {})["choices"][0]
    assert out["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in out["message"]["tool_calls"]] == ["get_time", "get_weather"]
    assert json.loads(out["message"]["tool_calls"][1]["function"]["arguments"]) == {"city": "Oslo"}


def test_parallel_tool_calls_false_keeps_the_first_call():
    two = TEXT + '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    fmt = ToolChat(Chat("x", "m", False), plan(tools=[WEATHER, TIME], parallel_tool_calls=False))
    assert [c["function"]["name"] for c in fmt.body([choice(two)], {})["choices"][0]["message"]["tool_calls"]] == [
        "get_weather"]


def sse_chunks(fmt, pieces):
    class B:
        include_usage, n = False, 1

    async def events():
        for k, p in enumerate(pieces):
            last = k == len(pieces) - 1
            yield 0, delta(p, last, "stop" if last else None)

    async def run():
        return [json.loads(s[len("data: "):]) async for s in render_text(fmt, B(), [0], events())]
    return asyncio.run(run())


def test_stream_equals_body_fed_a_few_characters_at_a_time():
    two = TEXT + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    p = plan(tools=[WEATHER, TIME])
    chunks = sse_chunks(ToolChat(Chat("x", "m", False), p), [two[i:i + 3] for i in range(0, len(two), 3)])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content, calls = "", {}
    for ch in chunks[1:]:
        d = ch["choices"][0]["delta"]
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                assert tc["index"] not in calls and tc["type"] == "function"
                calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
    body_msg = ToolChat(Chat("x", "m", False), p).body([choice(two)], {})["choices"][0]["message"]
    assert content == body_msg["content"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in body_msg["tool_calls"]]
    frags = [tc for ch in chunks for tc in ch["choices"][0]["delta"].get("tool_calls", []) if "id" not in tc]
    assert len(frags) > 3                                              # arguments stream in pieces


def test_stream_without_tools_is_unchanged():
    chunks = sse_chunks(Chat("x", "m", False), ["Hel", "lo <tool_call>"])
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[1:]) == "Hello <tool_call>"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
