"""Each family's parser on what its tiny model generates from its real chat template (the format
forced by a structured-outputs regex: random weights would never write it), with the
stage's stream of deltas giving the same calls as the whole text."""

import json

import pytest

from omni_ray.ar import LLM, SamplingParams
from omni_ray.ar.structured_outputs import StructuredOutputsParams
from omni_ray.stages.ar import render_chat
from omni_ray.tool_parsers import HermesParser, Llama3JsonParser, ToolCall, collect

TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}}}]
USER = [{"role": "user", "content": "What time is it?"}]
CASES = {
    "tiny:llama": (Llama3JsonParser, r'\{"name": "get_time", "parameters": \{"tz": "(UTC|CET)"\}\}'),
    "tiny:qwen2": (HermesParser,
                   r'<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}\n</tool_call>'),
}


@pytest.mark.parametrize("model", sorted(CASES))
def test_family_parser_reads_its_models_calls(model):
    parser, regex = CASES[model]
    llm = LLM(model, enforce_eager=True, device="cpu", kvcache_block_size=16, num_kvcache_blocks=128,
              max_model_len=1024)
    prompt = render_chat(llm.tokenizer, USER, TOOLS)
    assert "get_time" in llm.tokenizer.decode(prompt)                # the template rendered the tool
    so = StructuredOutputsParams(regex=regex)
    [out] = llm.generate([prompt], SamplingParams(temperature=1.0, seed=0, max_tokens=64, structured_outputs=so),
                         use_tqdm=False)
    msg = parser.parse(out["text"])
    assert msg.content is None and len(msg.calls) == 1 and msg.calls[0].name == "get_time"
    assert json.loads(msg.calls[0].arguments)["tz"] in ("UTC", "CET")
    stream, events = parser(), []                          # the text as the engine's per-token deltas
    for i in range(len(out["token_ids"])):
        before = llm.tokenizer.decode(out["token_ids"][:i])
        events += stream.feed(llm.tokenizer.decode(out["token_ids"][:i + 1])[len(before):])
    assert collect(events + stream.end()).calls == [ToolCall("get_time", msg.calls[0].arguments)]
