"""The tiny checkpoints carry their real models' chat templates (Qwen2.5, Qwen3, Llama 3.1), so
tools, assistant tool calls and tool results render as they do for the real models."""

import json

import pytest
from transformers import AutoTokenizer

from omni_ray.errors import InvalidRequestError
from omni_ray.stages.ar import prompt_ids, render_chat
from omni_ray.stages.requests import ARRequest
from omni_ray.testing import resolve_model

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture(scope="module")
def tokenizers():
    return {m: AutoTokenizer.from_pretrained(str(resolve_model(m))) for m in ("tiny:qwen3", "tiny:qwen2", "tiny:llama")}


def text(tok, messages, tools=None):
    return tok.decode(render_chat(tok, messages, tools))


@pytest.mark.parametrize("model", ["tiny:qwen3", "tiny:qwen2"])
def test_qwen_templates_render_tools_calls_and_results(tokenizers, model):
    tok = tokenizers[model]
    out = text(tok, HISTORY, TOOLS)
    assert "# Tools\n\nYou may call one or more functions" in out
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in out
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>") in out
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in out
    assert out.endswith("<|im_start|>assistant\n")
    ids = render_chat(tok, HISTORY, TOOLS)
    assert tok.convert_tokens_to_ids("<tool_call>") in ids           # one token, as in the real tokenizer
    assert tok.decode([tok.convert_tokens_to_ids("<tool_call>")], skip_special_tokens=True) == "<tool_call>"


def test_qwen2_5_default_system_prompt_and_no_tools(tokenizers):
    out = text(tokenizers["tiny:qwen2"], [{"role": "user", "content": "Hi"}])
    assert out == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                   "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "# Tools" not in out


def test_qwen3_plain_chat_is_chatml(tokenizers):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = text(tokenizers["tiny:qwen3"], msgs)
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_1_template_renders_tools_in_the_first_user_message(tokenizers):
    tok = tokenizers["tiny:llama"]
    out = text(tok, HISTORY, TOOLS)
    assert out.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert "Given the following functions, please respond with a JSON for a function call" in out
    assert json.dumps(TOOLS[0], indent=4) + "\n\nWeather in Paris?<|eot_id|>" in out
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
            '{"city": "Paris"}}<|eot_id|>') in out
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"sunny, 21 C"<|eot_id|>' in out
    assert out.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<|python_tag|>" in tok.convert_ids_to_tokens(tok.encode("<|python_tag|>"))


def test_llama3_1_template_errors_are_request_errors(tokenizers):
    two = [dict(HISTORY[1], tool_calls=HISTORY[1]["tool_calls"] * 2)]
    with pytest.raises(InvalidRequestError, match="single tool-calls") as e:
        render_chat(tokenizers["tiny:llama"], [HISTORY[0]] + two, TOOLS)
    assert e.value.param == "messages"


def test_ar_request_tools_reach_the_template(tokenizers):
    tok = tokenizers["tiny:qwen3"]
    with_tools = prompt_ids(tok, ARRequest("r", messages=HISTORY[:1], tools=TOOLS))
    without = prompt_ids(tok, ARRequest("r", messages=HISTORY[:1]))
    assert len(with_tools) > len(without) and tok.decode(with_tools).count("get_weather") == 1
    with pytest.raises(InvalidRequestError) as e:
        ARRequest("r", prompt="x", tools=TOOLS)
    assert e.value.param == "tools"
    assert ARRequest("r", messages=HISTORY[:1], tools=TOOLS).input_digest() != ARRequest(
        "r", messages=HISTORY[:1]).input_digest()


def test_a_template_without_tools_refuses_them():
    from omni_ray.testing.tokenizer import CHATML_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(resolve_model("tiny:qwen3")))
    tok.chat_template = CHATML_TEMPLATE                       # knows nothing of tools (as Qwen2.5-VL's)
    with pytest.raises(InvalidRequestError) as e:
        render_chat(tok, HISTORY[:1], TOOLS)
    assert e.value.param == "tools" and "does not render tools" in e.value.message
    assert render_chat(tok, HISTORY[:1]) == render_chat(tok, HISTORY[:1], [])


def test_tools_with_media_are_refused_not_dropped():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(InvalidRequestError) as e:
        ARRequest("r", messages=[{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}], tools=TOOLS)
    assert e.value.param == "tools"
