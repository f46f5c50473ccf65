"""``POST /generate`` (vLLM-omni's API server route) as the body of ``/v1/pipelines/{name}``."""

import pytest

from deployments.openai.protocol import GenerateRequest, PipelineRequest
from omni_ray.config import OmniConfig
from omni_ray.errors import InvalidRequestError
from tests.serve.conftest import app_config

PIPES = OmniConfig.model_validate(app_config()).pipelines


def test_list_stage_args_become_per_stage_args():
    body = GenerateRequest.model_validate({"prompt": "a fox", "pipeline": "text2image", "max_tokens": 8,
                                           "stage_args": [{"prompt": "a fox", "temperature": 0.0},
                                                          {"num_inference_steps": 2, "size": "64x64"}]})
    name, pipe = body.to_pipeline(PIPES)
    assert name == "text2image" and type(pipe) is PipelineRequest
    assert pipe.stage_args == {"llm": {"temperature": 0.0}, "image": {"num_inference_steps": 2, "size": "64x64"}}
    assert (pipe.prompt, pipe.max_tokens, pipe.stream) == ("a fox", 8, False)


def test_dict_stage_args_and_the_only_or_default_pipeline():
    body = GenerateRequest.model_validate({"prompt": "hi", "stage_args": {"llm": {"max_tokens": 2}}})
    assert body.to_pipeline({"chat": PIPES["chat"]}) == ("chat", PipelineRequest.model_validate(
        {"prompt": "hi", "stage_args": {"llm": {"max_tokens": 2}}}))
    assert body.to_pipeline({"default": PIPES["chat"], "image": PIPES["image"]})[0] == "default"


@pytest.mark.parametrize("raw, param", [
    ({"prompt": "hi"}, "pipeline"),                                                   # several, none default
    ({"prompt": "hi", "pipeline": "nope"}, "pipeline"),
    ({"prompt": "hi", "pipeline": "text2image", "stage_args": [{}]}, "stage_args"),
    ({"prompt": "hi", "pipeline": "text2image", "stage_args": [{}, {"prompt": "other"}]}, "stage_args.1.prompt"),
])
def test_errors_name_the_field(raw, param):
    with pytest.raises(InvalidRequestError) as err:
        GenerateRequest.model_validate(raw).to_pipeline(PIPES)
    assert err.value.param == param and err.value.http_status == 400
