"""The request contract without Ray: each rule declared once with one message (offline params, HTTP
models, stage arguments), HTTP bodies converted into the engines' params, typed stage requests
that survive pickling."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch

from deployments.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ImageGenerationRequest,
    PipelineRequest,
)
from omni_ray.ar.sampling_params import ENGINE_ONLY_KEYS, SAMPLING_RULES, SamplingParams
from omni_ray.dit.params import DIFFUSION_RULES, DiffusionParams, StepCacheParams, parse_size
from omni_ray.errors import InvalidRequestError
from omni_ray.runner import AR_STEP_KEYS, DIT_STEP_KEYS, StageArgs, step_kwargs
from omni_ray.stages import ARRequest, DiTRequest, Handoff


def error_of(fn) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        fn()
    return e.value


# ----------------------------------------------------------------------------- one rule, one message
@pytest.mark.parametrize("field,value", [("temperature", math.nan), ("temperature", 2.5), ("temperature", -1.0),
                                         ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("max_tokens", -1),
                                         ("seed", -1)])
def test_a_sampling_rule_has_one_message_wherever_it_is_broken(field, value):
    """SamplingParams (offline: LLM, OmniLLM), an HTTP body's conversion, OmniLLM / handle keyword
    arguments and a pipeline's stage_args all say the same, naming the same field."""
    offline = error_of(lambda: SamplingParams(**{field: value}))
    assert offline.param == field and offline.message.startswith(f"{field} must be ")
    http = error_of(lambda: CompletionRequest(prompt="x", **{field: value}).to_sampling_params())
    chat = error_of(lambda: ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                                  **{field: value}).to_sampling_params())
    kwargs = error_of(lambda: StageArgs.from_kwargs({field: value}))
    assert (http.message, http.param) == (chat.message, chat.param) == (kwargs.message, kwargs.param) == (
        offline.message, offline.param)
    staged = error_of(lambda: step_kwargs("ar", {field: value}, "stage_args.llm."))
    assert (staged.message, staged.param) == (f"stage_args.llm.{offline.message}", f"stage_args.llm.{field}")


@pytest.mark.parametrize("field,value", [("num_inference_steps", 0), ("guidance_scale", math.inf),
                                         ("guidance_scale", -1.0), ("seed", 2**63), ("height", 33), ("width", 0)])
def test_a_diffusion_rule_has_one_message_wherever_it_is_broken(field, value):
    offline = error_of(lambda: DiffusionParams(**{field: value}))
    assert offline.param == field
    kwargs = error_of(lambda: StageArgs.from_kwargs({field: value}))
    assert (kwargs.message, kwargs.param) == (offline.message, offline.param)
    if field in ImageGenerationRequest.model_fields:
        http = error_of(lambda: ImageGenerationRequest(prompt="x", **{field: value}).to_diffusion_params())
        assert (http.message, http.param) == (offline.message, offline.param)


def test_openai_n_keeps_its_name():
    for e in (error_of(lambda: ImageGenerationRequest(prompt="x", n=0).to_diffusion_params()),
              error_of(lambda: StageArgs.from_kwargs({"n": 0})),
              error_of(lambda: step_kwargs("dit", {"n": 0}, "stage_args.image."))):
        assert e.param.endswith("n") and "must be an integer >= 1" in e.message


def test_the_openapi_bounds_are_the_rules():
    """The HTTP models document each range from the same table the params check."""
    for model, field, rule in [(ChatCompletionRequest, "temperature", SAMPLING_RULES["temperature"]),
                               (CompletionRequest, "top_p", SAMPLING_RULES["top_p"]),
                               (CompletionRequest, "max_tokens", SAMPLING_RULES["max_tokens"]),
                               (PipelineRequest, "temperature", SAMPLING_RULES["temperature"]),
                               (ImageGenerationRequest, "num_inference_steps", DIFFUSION_RULES["num_inference_steps"]),
                               (ImageGenerationRequest, "n", DIFFUSION_RULES["num_images_per_prompt"])]:
        prop = model.model_json_schema()["properties"][field]
        assert {k: prop[k] for k in rule.json_schema()} == rule.json_schema(), (model, field)
    t = ChatCompletionRequest.model_json_schema()["properties"]["temperature"]
    assert (t["minimum"], t["maximum"]) == (0.0, 2.0)


def test_prompt_rules_have_one_message():
    from omni_ray.rules import check_prompt, check_text

    empty = [error_of(lambda: ARRequest("r", prompt="")), error_of(lambda: check_text("")),
             error_of(lambda: check_prompt(""))]
    assert {(e.message, e.param) for e in empty} == {("prompt is empty", "prompt")}
    assert error_of(lambda: ARRequest("r", prompt=[])).param == "prompt"
    assert error_of(lambda: ARRequest("r", prompt=[1, True])).message == "token ids must be integers"
    assert error_of(lambda: ARRequest("r", prompt="x", messages=[{"role": "user", "content": "y"}])).param == "prompt"
    assert error_of(lambda: ARRequest("r", messages=[])).param == "messages"
    assert error_of(lambda: ARRequest("r", prompt="x", params={"max_tokens": 3})).param == "params"
    assert error_of(lambda: ARRequest("r", prompt="x", multi_modal_data={"video": b""})).param == "multi_modal_data"
    assert error_of(lambda: ARRequest("r", prompt=[1, 2], multi_modal_data={"image": b""})).param == "multi_modal_data"


def test_size_is_parsed_in_one_place():
    assert parse_size("64x32") == (32, 64)
    assert ImageGenerationRequest(prompt="p", size="64x32").to_diffusion_params().height == 32
    assert step_kwargs("dit", {"size": "64x32"}) == {"height": 32, "width": 64}
    assert StageArgs.from_kwargs({"size": "64x32"}).image == {"height": 32, "width": 64}
    for bad in ("64", "63x64"):
        assert error_of(lambda: parse_size(bad)).param == "size"
        assert error_of(lambda: step_kwargs("dit", {"size": bad}, "stage_args.image.")).param == "stage_args.image.size"


def test_step_keys_come_from_the_params():
    assert {f.name for f in dataclasses.fields(SamplingParams)} - ENGINE_ONLY_KEYS <= AR_STEP_KEYS
    # what a pipeline wires (a thinker's hidden states for its talker) is no client's argument
    assert error_of(lambda: step_kwargs("ar", {"return_hidden_states": True}, "stage_args.thinker.")).param == \
        "stage_args.thinker.return_hidden_states"
    assert {f.name for f in dataclasses.fields(DiffusionParams) if f.init} <= DIT_STEP_KEYS
    assert error_of(lambda: step_kwargs("ar", {"bogus": 1}, "stage_args.llm.")).param == "stage_args.llm.bogus"
    assert step_kwargs("ar", {"stop_token_ids": [3], "skip_special_tokens": False}) == {
        "stop_token_ids": [3], "skip_special_tokens": False}


# ----------------------------------------------------------------------------- HTTP -> params
def test_http_bodies_convert_to_the_engines_params():
    c = CompletionRequest(prompt="x", temperature=0.5, top_k=4, stop="END", seed=3, logprobs=0, max_tokens=7)
    assert c.to_sampling_params() == SamplingParams(temperature=0.5, top_k=4, stop=["END"], seed=3, logprobs=0,
                                                    max_tokens=7)
    assert CompletionRequest(prompt="x").to_sampling_params().max_tokens == 16      # OpenAI's default
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=9, max_completion_tokens=5)
    p = chat.to_sampling_params()
    assert p.max_tokens == 5 and p.logprobs is None and p.temperature == 1.0
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).to_sampling_params().max_tokens is None
    img = ImageGenerationRequest(prompt="p", size="64x32", n=2, seed=3, cache="fbcache")
    d = img.to_diffusion_params()
    assert (d.height, d.width, d.num_images_per_prompt, d.seed) == (32, 64, 2, 3)
    assert d.step_cache == StepCacheParams("fbcache", 0.08)
    pipe = PipelineRequest(prompt="p", max_tokens=8, temperature=0.0, size="64x64", stage_args={"llm": {"top_k": 2}})
    assert pipe.to_sampling_params() == SamplingParams(max_tokens=8, temperature=0.0)
    args = pipe.to_stage_args()
    assert args.text == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0} and args.image["height"] == 64
    assert args.per_stage == {"llm": {"top_k": 2}}


def test_max_tokens_none_fills_the_context_in_one_place():
    p = SamplingParams(max_tokens=None)
    assert p.resolve_max_tokens(10, 64).max_tokens == 54
    assert p.resolve_max_tokens(10, 64, cap=16).max_tokens == 16
    assert SamplingParams(max_tokens=5).resolve_max_tokens(10, 64).max_tokens == 5
    assert error_of(lambda: p.resolve_max_tokens(64, 64)).param == "prompt"


# ----------------------------------------------------------------------------- typed requests
def test_typed_requests_survive_pickling():
    """Stage requests travel over Ray as they are (pickled): equal on arrival, not re-checked."""
    ar = ARRequest("r-0", prompt=[1, 2, 3], system_prompt="sys",
                   params=SamplingParams(temperature=0.0, max_tokens=None, stop=["x"], seed=4), layer=-1)
    chat = ARRequest("r-1", messages=[{"role": "user", "content": "hi"}])
    hand = Handoff(shape=[3, 8], tensor=torch.arange(24.0).view(3, 8), dtype="float32", source={"model": "m"})
    dit = DiTRequest("r-2", prompt=None, params=DiffusionParams(height=64, width=64, cache="teacache"),
                     conditioning=hand)
    for req in (ar, chat, DiTRequest("r-3", prompt="a fox")):
        assert pickle.loads(pickle.dumps(req)) == req
    back = pickle.loads(pickle.dumps(dit))
    assert back.params == dit.params and back.params.step_cache == StepCacheParams("teacache", 0.3)
    assert torch.equal(back.conditioning.tensor, hand.tensor) and back.conditioning.source == {"model": "m"}
    assert hand.public() == {"shape": [3, 8], "dtype": "float32", "source": {"model": "m"}}


def test_stage_args_build_each_steps_params_once():
    from omni_ray.config import OmniConfig, validate
    from omni_ray.graphs import expand_pipelines
    from omni_ray.runner import step_request
    from tests.serve.conftest import app_config

    cfg = expand_pipelines(validate(OmniConfig, app_config()))
    kinds = {k: s.kind for k, s in cfg.stages.items()}
    pipe = cfg.pipelines["text2image"]
    args = StageArgs.from_kwargs({"max_tokens": 8, "size": "64x64", "seed": 1, "stage_args": {"llm": {"top_k": 3}}})
    args.validate("text2image", pipe, kinds)
    first = args.params_for(0, pipe.steps[0], "ar")[0]
    assert first is args.params_for(0, pipe.steps[0], "ar")[0]
    assert (first.max_tokens, first.top_k, first.seed) == (8, 3, 1)
    ar = step_request(0, pipe.steps[0], "ar", "a fox", args, "p-0")
    assert isinstance(ar, ARRequest) and ar.params is first and ar.messages[-1] == {"role": "user", "content": "a fox"}
    dit = step_request(1, pipe.steps[1], "dit", "a red fox", args, "p-1")
    assert isinstance(dit, DiTRequest) and (dit.prompt, dit.params.height, dit.params.seed) == ("a red fox", 64, 1)
