"""The request fields of structured outputs (response_format, structured_outputs, guided_*) become one
StructuredOutputsParams, or a 400 naming the field (no Ray: the protocol models and the handle's
argument validation)."""

from __future__ import annotations

import pytest

from deployments.ingress.handle_args import validated
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest
from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.ar.structured_outputs import StructuredOutputsParams
from omni_ray.errors import InvalidRequestError

MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**kw) -> SamplingParams:
    return validated(ChatCompletionRequest, messages=MSG, **kw).to_sampling_params()


@pytest.mark.parametrize("kw, kind, value, param", [
    ({"response_format": {"type": "json_object"}}, "json_object", True, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     "json", SCHEMA, "response_format"),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "[a-z]+", "structured_outputs"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", ("a", "b"), "structured_outputs"),
    ({"structured_outputs": {"json": SCHEMA}}, "json", SCHEMA, "structured_outputs"),
    ({"guided_json": SCHEMA}, "json", SCHEMA, "guided_json"),
    ({"guided_regex": "x+"}, "regex", "x+", "guided_regex"),
    ({"guided_choice": ["p", "q"]}, "choice", ("p", "q"), "guided_choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"', "guided_grammar"),
])
def test_each_field_becomes_the_params(kw, kind, value, param):
    so = chat(**kw).structured_outputs
    assert so.kind == kind and getattr(so, kind) == value and so.param == param
    comp = validated(CompletionRequest, prompt="x", **kw).to_sampling_params().structured_outputs
    assert comp == so


def test_text_and_nothing_mean_no_constraint():
    assert chat(response_format={"type": "text"}).structured_outputs is None
    assert chat().structured_outputs is None


@pytest.mark.parametrize("kw, param, words", [
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "nope"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format.extra", "not permitted"),
    ({"structured_outputs": {"regex": "(["}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", "not permitted"),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "grammar"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "response_format"),
])
def test_bad_constraints_are_a_400_naming_the_field(kw, param, words):
    with pytest.raises(InvalidRequestError) as e:
        chat(**kw)
    assert e.value.param == param and words in str(e.value), str(e.value)


def test_offline_params_take_vllm_dict_shape():
    p = SamplingParams(structured_outputs={"json": SCHEMA})
    assert p.structured_outputs == StructuredOutputsParams(json=SCHEMA)
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(structured_outputs={"jsn": SCHEMA})
    assert e.value.param == "structured_outputs.jsn"
