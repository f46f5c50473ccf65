"""What a request body may ask for, without Ray: OpenAI fields the server does not honour are a 400
naming the field (never silently ignored), fields that change nothing are accepted, and each
limit's message names the actual limit and the actual problem."""

from __future__ import annotations

import math

import pytest

from deployments.ingress.handle_args import validated
from deployments.ingress.limits import check_pipeline_limits, check_text_limits
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest, ImageGenerationRequest
from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.config import LimitsConfig, OmniConfig, validate
from omni_ray.dit.params import DiffusionParams
from omni_ray.errors import InvalidRequestError

MSG = [{"role": "user", "content": "Hi"}]


def refused(cls, **body) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        cls(**body)
    return e.value


@pytest.mark.parametrize("field,value,says", [
    ("functions", [{"name": "f", "parameters": {}}], "use tools"),
    ("function_call", "auto", "use tool_choice"),
    ("function_call", {"name": "f"}, "use tool_choice"),
    ("logit_bias", {"15": 100}, "logit_bias"),
    ("reasoning_effort", "high", "reasoning_effort"),
    ("verbosity", "low", "verbosity"),
    ("web_search_options", {}, None),              # {} asks for nothing: accepted
    ("web_search_options", {"search_context_size": "low"}, "web search"),
])
def test_chat_refuses_what_it_does_not_honour(field, value, says):
    if says is None:
        ChatCompletionRequest(messages=MSG, **{field: value})
        return
    err = refused(ChatCompletionRequest, messages=MSG, **{field: value})
    assert err.param == field and says in err.message and err.http_status == 400


@pytest.mark.parametrize("field,value,says", [
    ("suffix", " the end", "suffix"),
    ("logit_bias", {"15": -100}, "logit_bias"),
])
def test_completions_refuse_what_they_do_not_honour(field, value, says):
    err = refused(CompletionRequest, prompt="x", **{field: value})
    assert err.param == field and says in err.message


def test_stream_options_without_stream():
    assert ChatCompletionRequest(messages=MSG, stream=True, stream_options={"include_usage": True}).include_usage
    err = refused(ChatCompletionRequest, messages=MSG, stream_options={"include_usage": True})
    assert err.param == "stream_options"


def test_best_of():
    assert CompletionRequest(prompt="x", best_of=2, n=2).n == 2           # best_of == n: what n does
    assert CompletionRequest(prompt="x", best_of=None).best_of is None
    more = refused(CompletionRequest, prompt="x", best_of=3, n=1)
    assert more.param == "best_of" and "best_of > n is not supported" in more.message and "best_of=3" in more.message
    fewer = refused(CompletionRequest, prompt="x", best_of=1, n=2)
    assert fewer.param == "best_of" and "must be >= n" in fewer.message


def test_values_that_ask_for_nothing_and_harmless_fields_are_accepted():
    req = ChatCompletionRequest(messages=MSG, functions=[], function_call="none", logit_bias={}, modalities=["text"],
                                audio=None, store=True, metadata={"k": "v"}, service_tier="auto", user="u",
                                prediction={"type": "content", "content": "x"}, prompt_cache_key="k",
                                safety_identifier="s", parallel_tool_calls=True)
    assert req.to_sampling_params() == ChatCompletionRequest(messages=MSG).to_sampling_params()
    assert CompletionRequest(prompt="x", suffix="", logit_bias=None).prompts() == ["x"]


@pytest.mark.parametrize("field,value", [("quality", "hd"), ("quality", "high"), ("style", "vivid"),
                                         ("output_format", "jpeg"), ("output_compression", 50),
                                         ("background", "transparent"), ("stream", True), ("partial_images", 2)])
def test_images_refuse_what_they_do_not_honour(field, value):
    err = refused(ImageGenerationRequest, prompt="a fox", **{field: value})
    assert err.param == field


def test_images_accept_the_defaults_openai_clients_send():
    body = ImageGenerationRequest(prompt="a fox", quality="auto", output_format="png", background="auto",
                                  stream=False, moderation="low")
    assert body.n == 1


def test_python_handle_arguments_are_refused_alike():
    with pytest.raises(InvalidRequestError) as e:
        validated(CompletionRequest, prompt="x", suffix="y")
    assert e.value.param == "suffix"


def test_validation_messages_have_no_pydantic_prefix():
    from pydantic import ValidationError

    from deployments.ingress.http import validation_message

    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest(messages=MSG, presence_penalty=1.0)
    msg, param = validation_message(e.value.errors())
    assert param == "presence_penalty" and msg == "presence_penalty: penalties are not supported (must be 0)"


# ----------------------------------------------------------------------------- messages that name the limit
def test_stop_over_the_app_limit_names_the_app_limit_and_the_count():
    lim = LimitsConfig()                                      # max_stop_sequences 4
    for n in (5, 8, 20):                                      # 20: over the engine's 16 too
        req = CompletionRequest(prompt="x", stop=[f"s{i}" for i in range(n)])
        with pytest.raises(InvalidRequestError) as e:
            check_text_limits(req, lim)
        assert e.value.param == "stop"
        assert e.value.message == f"stop has {n} strings; this server allows at most 4 (app.limits.max_stop_sequences)"
    check_text_limits(CompletionRequest(prompt="x", stop=["a", "b", "c", "d", "", ""]), lim)   # empty ones don't count


def test_pipeline_stop_over_the_app_limit_is_told_before_the_engine_bound():
    from omni_ray.graphs import expand_pipelines
    from omni_ray.runner import StageArgs
    from tests.reliability.conftest import base_config

    cfg = expand_pipelines(validate(OmniConfig, base_config()))
    kinds = {k: s.kind for k, s in cfg.stages.items()}
    for args, param in [(StageArgs(text={"stop": ["a"] * 20}), "stop"),
                        (StageArgs(per_stage={"llm": {"stop": ["a"] * 20}}), "stage_args.llm.stop")]:
        with pytest.raises(InvalidRequestError) as e:
            check_pipeline_limits("chat", cfg.pipelines["chat"], kinds, args, LimitsConfig())
        assert e.value.param == param and "has 20 strings; this server allows at most 4" in e.value.message


def test_engine_stop_bounds_say_count_or_length():
    with pytest.raises(InvalidRequestError) as count:
        SamplingParams(stop=["a"] * 17)
    assert count.value.message == "stop has 17 strings; at most 16 are allowed"
    with pytest.raises(InvalidRequestError) as length:
        SamplingParams(stop=["ok", "x" * 300])
    assert length.value.message == "stop string 1 has 300 characters; at most 256 are allowed"


def test_max_tokens_and_n_name_the_limit_and_the_value():
    lim = LimitsConfig(max_tokens=16, max_n=2)
    cases = [(CompletionRequest(prompt="x", max_tokens=17), "max_tokens", "max_tokens is 17; this server allows "
              "at most 16"),
             (ChatCompletionRequest(messages=MSG, max_completion_tokens=40), "max_completion_tokens",
              "max_completion_tokens is 40"),
             (CompletionRequest(prompt="x", n=3), "n", "n is 3; this server allows at most 2")]
    for req, param, says in cases:
        with pytest.raises(InvalidRequestError) as e:
            check_text_limits(req, lim)
        assert e.value.param == param and e.value.message.startswith(says), e.value.message


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_numbers_are_told_as_such(value):
    got = "NaN (not a number)" if math.isnan(value) else "inf"
    with pytest.raises(InvalidRequestError) as t:
        ChatCompletionRequest(messages=MSG, temperature=value).to_sampling_params()
    assert t.value.param == "temperature"
    assert t.value.message == f"temperature must be a number in [0, 2] (0: greedy), got {got}"
    with pytest.raises(InvalidRequestError) as g:
        ImageGenerationRequest(prompt="x", guidance_scale=value).to_diffusion_params()
    assert g.value.param == "guidance_scale" and g.value.message.endswith(f"got {got}")
    with pytest.raises(InvalidRequestError):
        DiffusionParams(guidance_scale=value)


def test_docs_name_every_refused_field():
    from pathlib import Path

    from deployments.openai.protocol import CHAT_REFUSED, COMPLETION_REFUSED, IMAGE_REFUSED

    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    for table in (CHAT_REFUSED, COMPLETION_REFUSED, IMAGE_REFUSED):
        for field in table:
            assert f"`{field}`" in doc, f"docs/serving.md does not say that {field} is refused"
