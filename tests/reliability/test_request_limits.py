"""Request limits and stage_args checks without Ray: no pipeline, stage argument or request body gets past them."""

from __future__ import annotations

import pytest

from deployments.ingress.limits import check_pipeline_limits, check_text_limits
from deployments.openai.protocol import CompletionRequest, ImageGenerationRequest, _first_non_utf8
from omni_ray.config import LimitsConfig, OmniConfig, validate
from omni_ray.errors import InvalidRequestError
from omni_ray.graphs import expand_pipelines
from omni_ray.runner import StageArgs


# ----------------------------------------------------------------------------- request limits
def omni_config() -> OmniConfig:
    from tests.reliability.conftest import base_config
    return expand_pipelines(validate(OmniConfig, base_config()))


def limits(**kw) -> LimitsConfig:
    return validate(LimitsConfig, {"max_tokens": 16, "max_steps": 4, "max_image_pixels": 64 * 64, **kw})


def check(pipeline: str, per_stage=None, text=None, image=None, lim=None):
    cfg = omni_config()
    kinds = {k: s.kind for k, s in cfg.stages.items()}
    args = StageArgs(text=text or {}, image=image or {}, per_stage=per_stage or {})
    check_pipeline_limits(pipeline, cfg.pipelines[pipeline], kinds, args, lim or limits())
    return args


@pytest.mark.parametrize("pipeline,per_stage,param", [
    ("image", {"image": {"num_inference_steps": 5}}, "stage_args.image.num_inference_steps"),
    ("image", {"image": {"size": "128x128"}}, "stage_args.image.size"),
    ("image", {"image": {"height": 64, "width": 72}}, "stage_args.image.size"),
    ("image", {"image": {"n": 9}}, "stage_args.image.n"),
    ("image", {"image": {"height": 33}}, "stage_args.image.height"),
    ("image", {"image": {"guidance_scale": float("inf")}}, "stage_args.image.guidance_scale"),
    ("chat", {"llm": {"max_tokens": 17}}, "stage_args.llm.max_tokens"),
    ("chat", {"llm": {"temperature": "hot"}}, "stage_args.llm.temperature"),
    ("chat", {"llm": {"unknown": 1}}, "stage_args.llm.unknown"),
    ("chat", {"llm": {"stop": ["a"] * 5}}, "stage_args.llm.stop"),
    ("chat", {"image": {}}, "stage_args"),
    ("chat", {"llm": 5}, "stage_args.llm"),
    ("text2image", {"llm": {"max_tokens": 100}}, "stage_args.llm.max_tokens"),
])
def test_stage_args_cannot_bypass_limits(pipeline, per_stage, param):
    with pytest.raises(InvalidRequestError) as e:
        check(pipeline, per_stage)
    assert e.value.param == param


def test_request_wide_args_are_checked_too():
    with pytest.raises(InvalidRequestError) as e:
        check("chat", text={"max_tokens": 17})
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        check("image", image={"num_inference_steps": "many"})
    assert e.value.param == "num_inference_steps"


@pytest.mark.parametrize("pipeline,text,image,param", [
    ("chat", None, {"num_images_per_prompt": 9}, "n"),
    ("chat", None, {"num_inference_steps": 5}, "num_inference_steps"),
    ("chat", None, {"size": "128x128"}, "size"),
    ("image", {"max_tokens": 17}, None, "max_tokens"),
    ("image", {"stop": ["a"] * 5}, None, "stop"),
])
def test_request_wide_limits_hold_whatever_the_pipeline(pipeline, text, image, param):
    """A request-wide value over a limit is a 400 even where no step of the pipeline uses it (the
    OpenAPI document states these limits as bounds of the request body)."""
    with pytest.raises(InvalidRequestError) as e:
        check(pipeline, text=text, image=image)
    assert e.value.param == param


def test_valid_stage_args_pass_and_are_normalized():
    args = check("text2image", {"llm": {"max_tokens": 8, "stop": "x"}, "image": {"size": "64x32", "n": 2}})
    assert args.per_stage == {"llm": {"max_tokens": 8, "stop": ["x"]},
                              "image": {"height": 32, "width": 64, "num_images_per_prompt": 2}}


def test_chat_max_tokens_is_checked_even_when_max_completion_tokens_wins():
    from deployments.openai.protocol import ChatCompletionRequest
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=17, max_completion_tokens=4)
    with pytest.raises(InvalidRequestError) as e:
        check_text_limits(req, limits())
    assert e.value.param == "max_tokens"


def test_text_limits():
    lim = limits(max_n=2, max_prompts=2, max_prompt_tokens=4, max_stop_sequences=1)
    for body, param in [({"prompt": "x", "n": 3}, "n"), ({"prompt": ["a", "b", "c"]}, "prompt"),
                        ({"prompt": [1, 2, 3, 4, 5]}, "prompt"), ({"prompt": "x", "stop": ["a", "b"]}, "stop"),
                        ({"prompt": "x", "max_tokens": 17}, "max_tokens")]:
        req = CompletionRequest(**body)
        with pytest.raises(InvalidRequestError) as e:
            check_text_limits(req, lim)
        assert e.value.param == param, body


@pytest.mark.parametrize("body", [{"prompt": [[False]]}, {"prompt": "x", "n": 1.0}, {"prompt": "x", "max_tokens": "2"},
                                  {"prompt": "x", "stream": "yes"}, {"prompt": "\ud800"},
                                  {"prompt": "x", "stop": ["ok", "\udfff"]}])
def test_requests_are_strict(body):
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        CompletionRequest(**body)


def test_image_request_rejects_surrogates_anywhere():
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        ImageGenerationRequest(prompt="ok", cache={"method": "\ud800"})
    assert _first_non_utf8({"a": [{"b": "fine"}, {"\ud800": 1}]}) == "a.1"
