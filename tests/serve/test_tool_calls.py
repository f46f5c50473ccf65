"""Tool calls through the real `openai` client against `serve run serve_config.yaml` (tiny:qwen3,
random weights: only the constraint makes tool_choice required / named give valid calls)."""

import json

import pytest
from jsonschema import validate as validate_json

pytestmark = pytest.mark.ray

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "hourly": {"type": "boolean"},
        "fields": {"type": "array", "items": {"type": "string", "enum": ["rain", "wind"]}, "maxItems": 2}},
        "required": ["city", "unit", "days", "hourly", "fields"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object",
                                       "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
                                       "required": ["tz"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris this week?"}]


@pytest.fixture(scope="module")
def oai(omni_url):
    import openai

    return openai.OpenAI(base_url=omni_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def check_calls(calls, names=SCHEMAS):
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function" and c.function.name in names
        validate_json(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def streamed_calls(stream):
    """(content, calls as [(id, name, arguments)], finish_reason) rebuilt from chunks, checking the
    OpenAI streaming shape: a call's first entry has its id, type and name, the next ones its index only."""
    content, calls, finish = "", {}, None
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.index not in calls:
                assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                calls[tc.index] = [tc.id, tc.function.name, tc.function.arguments or ""]
            else:
                assert tc.id is None and not tc.function.name
                calls[tc.index][2] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("seed", [0, 1])
def test_required_gives_valid_tool_calls(oai, seed):
    r = oai.chat.completions.create(model="tiny-qwen3", messages=USER, tools=TOOLS, tool_choice="required",
                                    max_tokens=300, seed=seed, temperature=1.0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and not c.message.content
    check_calls(c.message.tool_calls)


def test_required_streamed_one_call(oai):
    kw = dict(model="tiny-qwen3", messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              max_tokens=300, seed=3)
    content, calls, finish = streamed_calls(oai.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    _, name, args = calls[0]
    validate_json(json.loads(args), SCHEMAS[name])
    full = oai.chat.completions.create(**kw).choices[0].message.tool_calls      # same seed: same call
    assert [(t.function.name, t.function.arguments) for t in full] == [(name, args)]


@pytest.mark.parametrize("stream", [False, True])
def test_named_function_gives_its_arguments(oai, stream):
    kw = dict(model="tiny-qwen3", messages=USER, tools=TOOLS, max_tokens=300, seed=5,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if stream:
        content, calls, finish = streamed_calls(oai.chat.completions.create(stream=True, **kw))
        assert content == "" and [n for _, n, _ in calls] == ["get_weather"]
        validate_json(json.loads(calls[0][2]), SCHEMAS["get_weather"])
    else:
        c = oai.chat.completions.create(**kw).choices[0]
        assert c.message.content is None and [t.function.name for t in c.message.tool_calls] == ["get_weather"]
        check_calls(c.message.tool_calls)
        finish = c.finish_reason
    assert finish == "stop"                         # a forced function finishes as "stop" (OpenAI, vLLM)


def test_second_turn_with_the_tool_result(oai):
    first = oai.chat.completions.create(model="tiny-qwen3", messages=USER, tools=TOOLS, max_tokens=300, seed=7,
                                        tool_choice={"type": "function", "function": {"name": "get_time"}})
    msg = first.choices[0].message
    history = USER + [msg.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"time": "12:00"}'}]
    second = oai.chat.completions.create(model="tiny-qwen3", messages=history, tools=TOOLS, max_tokens=8, seed=1,
                                         extra_body={"ignore_eos": True})
    c = second.choices[0]
    assert c.finish_reason in ("length", "tool_calls") and (c.message.content or c.message.tool_calls)
    without = oai.chat.completions.create(model="tiny-qwen3", messages=USER, tools=TOOLS, max_tokens=1)
    assert second.usage.prompt_tokens > without.usage.prompt_tokens + 10       # the call and its result rendered
    none = oai.chat.completions.create(model="tiny-qwen3", messages=USER, tools=TOOLS, tool_choice="none",
                                       max_tokens=1)
    assert none.usage.prompt_tokens < without.usage.prompt_tokens            # "none": tools not rendered


def test_tool_errors_are_400s_naming_the_field(oai):
    import openai

    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
         "tools.0.function.parameters"),
        (dict(messages=USER + [{"role": "tool", "content": "x"}]), "messages.1.tool_call_id"),
        (dict(tool_choice="required"), "tool_choice"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(**({"model": "tiny-qwen3", "messages": USER, "max_tokens": 4} | kw))
        assert e.value.body["param"] == param, e.value.body
    r = oai.chat.completions.create(model="tiny-qwen3", messages=USER, max_tokens=2)   # the app serves on
    assert r.choices[0].finish_reason in ("length", "stop")


# the model writes Qwen's format (forced here by vLLM's structured_outputs regex: random weights never
# would); tool_choice auto reads it with the stage's parser (hermes, from Qwen3ForCausalLM)
HERMES_REGEX = (r'Let me check\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}\n'
                r'</tool_call>\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo)", '
                r'"unit": "celsius", "days": [1-7], "hourly": (true|false), "fields": \[\]\}\}\n</tool_call>')


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_models_own_format(oai, stream):
    kw = dict(model="tiny-qwen3", messages=USER, tools=TOOLS, max_tokens=200, seed=2,
              extra_body={"structured_outputs": {"regex": HERMES_REGEX}})
    if stream:
        content, calls, finish = streamed_calls(oai.chat.completions.create(stream=True, **kw))
    else:
        c = oai.chat.completions.create(**kw).choices[0]
        content, finish = c.message.content, c.finish_reason
        calls = [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls]
    assert finish == "tool_calls" and content == "Let me check."
    assert [n for _, n, _ in calls] == ["get_time", "get_weather"]
    for _, name, args in calls:
        validate_json(json.loads(args), SCHEMAS[name])
    raw = oai.chat.completions.create(**(kw | {"tools": None})).choices[0].message.content   # no tools: the text
    assert raw.startswith("Let me check.\n<tool_call>\n") and raw.endswith("</tool_call>")
