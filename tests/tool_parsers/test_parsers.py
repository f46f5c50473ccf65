"""Tool-call parsers: several calls, text around them, invalid JSON, and streams fed one character
at a time (or in random pieces) giving what the non-streamed parse gives."""

import json
import random

import pytest

from omni_ray.errors import ConfigError
from omni_ray.tool_parsers import (
    CallArgs,
    CallStart,
    HermesParser,
    Llama3JsonParser,
    NamedParser,
    Parsed,
    RequiredParser,
    ToolCall,
    collect,
    default_parser,
    get_parser,
    required_schema,
)


def streamed(cls, text: str, pieces: list[int] | None = None, **kw):
    """Feed ``text`` in pieces of the given lengths (default: one character each); (message, events)."""
    p, events, pos = cls(**kw), [], 0
    for n in pieces or [1] * len(text):
        events += p.feed(text[pos:pos + n])
        pos += n
    events += p.feed(text[pos:]) + p.end()
    return collect(events), events


HERMES_CASES = [
    # (text, content, [(name, arguments)])
    ("Hello there", "Hello there", []),
    ("", "", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", '{"city": "Paris"}')]),
    ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": [1, 2, {"y": "}"}]}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>\nDone.',
     "Let me check.\n\n\nDone.", [("a", '{"x": [1, 2, {"y": "}"}]}'), ("b", "{}")]),
    # arguments before the name: known at the end, re-serialized
    ('<tool_call>{"arguments": {"q": "caf\\u00e9"}, "name": "search"}</tool_call>', None,
     [("search", '{"q": "café"}')]),
    # invalid JSON inside the tags: returned as content, as written
    ("Hi <tool_call>{not json}</tool_call> bye", "Hi <tool_call>{not json}</tool_call> bye", []),
    ('<tool_call>{"name": "f", "arguments": 3}</tool_call>',
     '<tool_call>{"name": "f", "arguments": 3}</tool_call>', []),
    # a valid call next to an invalid one
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call><tool_call>oops</tool_call>',
     "<tool_call>oops</tool_call>", [("f", '{"a": 1}')]),
    # the last call left open (the model stopped before </tool_call>)
    ('<tool_call>\n{"name": "f", "arguments": {"a": "b"}}\n', None, [("f", '{"a": "b"}')]),
    # text that only looks like the start of a tag
    ("a <tool b <tool_cal", "a <tool b <tool_cal", []),
    ('quote: "<tool_call" {}', 'quote: "<tool_call" {}', []),
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes_parse(text, content, calls):
    assert HermesParser.parse(text) == Parsed(content, [ToolCall(n, a) for n, a in calls])
    for args in (a for _, a in calls):
        json.loads(args)


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes_stream_one_char_at_a_time_equals_parse(text, content, calls):
    msg, events = streamed(HermesParser, text)
    assert msg == HermesParser.parse(text)


def test_hermes_stream_in_random_pieces():
    text = HERMES_CASES[3][0]
    rng = random.Random(0)
    for _ in range(50):
        pieces = [rng.randint(1, 7) for _ in range(len(text))]
        assert streamed(HermesParser, text, pieces)[0] == HermesParser.parse(text)


def test_hermes_streams_name_first_then_argument_fragments():
    text = 'ok<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
    _, events = streamed(HermesParser, text)
    starts = [e for e in events if isinstance(e, CallStart)]
    frags = [e.text for e in events if isinstance(e, CallArgs)]
    assert starts == [CallStart(0, "get_weather")]
    first_args = next(i for i, e in enumerate(events) if isinstance(e, CallArgs))
    assert events.index(starts[0]) < first_args
    assert len(frags) > 5 and "".join(frags) == '{"city": "Paris", "unit": "c"}'


def test_hermes_content_is_not_held_back_longer_than_needed():
    p = HermesParser()
    assert collect(p.feed("Hello ")).content == "Hello"          # trailing space held until text follows
    assert collect(p.feed("world <tool")).content == " world"      # "<tool" could begin a tag
    assert collect(p.feed("s>")).content == " <tools>"


LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": [2]}}',
     None, [("a", '{"x": 1}'), ("b", '{"y": [2]}')]),
    ('  {"parameters": {"x": 1}, "name": "a"}', None, [("a", '{"x": 1}')]),
    ("The weather is fine.", "The weather is fine.", []),
    ("  <|python", "  <|python", []),
    ('{"name": "a", "parameters": {"x": 1}} and some text', '{"name": "a", "parameters": {"x": 1}} and some text', []),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    ("{broken", "{broken", []),
]


@pytest.mark.parametrize("text,content,calls", LLAMA_CASES)
def test_llama3_json_parse_and_stream(text, content, calls):
    expected = Parsed(content, [ToolCall(n, a) for n, a in calls])
    assert Llama3JsonParser.parse(text) == expected
    if calls or not text.lstrip().startswith("{"):
        assert streamed(Llama3JsonParser, text)[0] == expected


def test_llama3_json_streams_each_call_as_it_comes():
    text = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": 2}}'
    _, events = streamed(Llama3JsonParser, text)
    order = [(type(e).__name__, e.index) for e in events if not isinstance(e, CallArgs) or e.text]
    assert order.index(("CallStart", 1)) > order.index(("CallArgs", 0))     # b starts after a's arguments


def test_required_parser_reads_the_constrained_array():
    text = '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'
    expected = Parsed(None, [ToolCall("f", '{"a": 1}'), ToolCall("g", "{}")])
    assert RequiredParser.parse(text) == expected
    assert streamed(RequiredParser, text)[0] == expected
    assert RequiredParser.parse("[]") == Parsed("[]", [])
    assert RequiredParser.parse('[{"name": "f", "parameters": {"a": 1}}') .calls == []    # cut short


def test_named_parser_makes_the_output_the_arguments():
    expected = Parsed(None, [ToolCall("f", '{"a": 1}')])
    assert NamedParser.parse('{"a": 1}', function="f") == expected
    msg, events = streamed(NamedParser, '{"a": 1}', function="f")
    assert msg == expected and events[0] == CallStart(0, "f")
    assert NamedParser.parse("", function="f") == Parsed(None, [ToolCall("f", "")])


def test_required_schema_shape():
    fns = [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}, {"name": "g"}]
    s = required_schema(fns)
    assert s["type"] == "array" and s["minItems"] == 1 and "maxItems" not in s
    assert [c["properties"]["name"]["enum"] for c in s["items"]["anyOf"]] == [["f"], ["g"]]
    assert s["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object"}
    assert required_schema(fns[:1], parallel=False)["maxItems"] == 1


def test_registry_and_family_defaults():
    assert get_parser("hermes") is HermesParser and get_parser("llama3_json") is Llama3JsonParser
    with pytest.raises(ConfigError, match="hermes"):
        get_parser("mistral")
    assert default_parser("Qwen3ForCausalLM") == "hermes" and default_parser("LlamaForCausalLM") == "llama3_json"
    assert default_parser("PixArtSigmaPipeline") is None
