"""vLLM-omni's offline API (implementation summary): ``create_ar_stage_config`` /
``create_dit_stage_config``, ``OmniLLM([ar, dit]).generate(stage_args)`` and ``AsyncOmniLLM``,
over the existing pipeline config and runner (in one process, without Ray)."""

from __future__ import annotations

import asyncio
import textwrap

import pytest
import torch
from PIL import Image

from omni_ray import AsyncOmniLLM, OmniLLM, create_ar_stage_config, create_dit_stage_config
from omni_ray.errors import ConfigError, InvalidRequestError
from omni_ray.vllm_omni_api import stages_to_config

# the "Basic Usage" block of vLLM-omni's implementation summary
BASIC_USAGE = '''
from vllm_omni import OmniLLM, create_ar_stage_config, create_dit_stage_config

# Create stage configurations
ar_config = create_ar_stage_config(
    stage_id=0,
    model_path="Qwen/Qwen3-0.6B",
    input_modalities=["text"],
    output_modalities=["text"]
)

dit_config = create_dit_stage_config(
    stage_id=1,
    model_path="stabilityai/stable-diffusion-2-1",
    input_modalities=["text"],
    output_modalities=["image"]
)

# Create OmniLLM instance
omni_llm = OmniLLM([ar_config, dit_config])

# Generate with multi-stage processing
stage_args = [
    {"prompt": "A beautiful landscape"},
    {"prompt": "A beautiful landscape"}
]

outputs = omni_llm.generate(stage_args)
'''

# the async form of vLLM-omni's simple usage example (one AR stage)
ASYNC_USAGE = '''
import asyncio
from vllm_omni.entrypoints.omni_llm import OmniLLM, AsyncOmniLLM
from vllm_omni.config import create_ar_stage_config


async def async_example():
    stage_config = create_ar_stage_config(
        stage_id=0,
        model_path="Qwen/Qwen3-0.6B",
        input_modalities=["text"],
        output_modalities=["text"]
    )
    omni_llm = AsyncOmniLLM([stage_config])
    stage_args = [{
        "prompt": "What is artificial intelligence?",
        "max_tokens": 100,
        "temperature": 0.8
    }]
    outputs = await omni_llm.generate_async(stage_args)
    for i, output in enumerate(outputs):
        print(f"Output {i}:")
        if hasattr(output, 'outputs') and output.outputs:
            for completion in output.outputs:
                print(f"  Text: {completion.text}")
                print(f"  Finished: {completion.finish_reason != 'length'}")
                print(f"  Tokens: {len(completion.token_ids)} tokens")
    await omni_llm.shutdown()
    return outputs

outputs = asyncio.run(async_example())
'''

IMPORTS = {
    "from vllm_omni import OmniLLM, create_ar_stage_config, create_dit_stage_config":
        "from omni_ray import OmniLLM, create_ar_stage_config, create_dit_stage_config",
    "from vllm_omni.entrypoints.omni_llm import OmniLLM, AsyncOmniLLM":
        "from omni_ray import OmniLLM, AsyncOmniLLM",
    "from vllm_omni.config import create_ar_stage_config": "from omni_ray import create_ar_stage_config",
}
MODELS = {'"Qwen/Qwen3-0.6B"': '"tiny:qwen3"', '"stabilityai/stable-diffusion-2-1"': '"tiny:pixart"'}


def run_doc(source: str) -> dict:
    src = textwrap.dedent(source)
    for a, b in (IMPORTS | MODELS).items():
        src = src.replace(a, b)
    assert "vllm_omni" not in src
    scope: dict = {"__name__": "__main__"}
    exec(compile(src, "<vllm-omni example>", "exec"), scope)           # noqa: S102 - our own test text
    return scope


def ar(stage_id=0, out=("text",), **kw):
    return create_ar_stage_config(stage_id, "tiny:qwen3", ["text"], list(out), enforce_eager=True,
                                  num_kvcache_blocks=256, kvcache_block_size=16, max_model_len=512, **kw)


def dit(stage_id=1, model="tiny:pixart", inp=("text",), **kw):
    return create_dit_stage_config(stage_id, model, list(inp), ["image"], **kw)


# ----------------------------------------------------------------------------- the documents' examples
def test_basic_usage_of_the_implementation_summary():
    scope = run_doc(BASIC_USAGE)
    llm, outputs = scope["omni_llm"], scope["outputs"]
    try:
        assert [o.stage_id for o in outputs] == [0, 1]
        text, image = outputs
        assert text.final_output_type == "text" and text.prompt == "A beautiful landscape"
        comp = text.outputs[0]
        assert comp.text == text.text and 1 <= len(comp.token_ids) <= 16          # vLLM's default max_tokens
        assert comp.finish_reason in ("stop", "length")
        assert image.final_output_type == "images" and isinstance(image.images[0], Image.Image)
        assert llm.config.pipelines["default"].steps[1].input == "text"            # the DiT drew the AR's text
    finally:
        llm.shutdown()


def test_async_usage_example(capsys):
    outputs = run_doc(ASYNC_USAGE)["outputs"]
    printed = capsys.readouterr().out
    assert len(outputs) == 1 and "Output 0:" in printed and "Tokens: " in printed
    n = len(outputs[0].outputs[0].token_ids)
    assert 1 <= n <= 100 and f"Tokens: {n} tokens" in printed


# ----------------------------------------------------------------------------- offline and async shapes
@pytest.fixture(scope="module")
def text2image():
    llm = OmniLLM([dit(1, dit_config={"num_inference_steps": 2, "height": 32, "width": 32, "batch_size": 4}),
                   ar(0)])                                     # listed out of order: stage_id decides
    yield llm
    llm.shutdown()


def test_stage_list_builds_the_pipeline_config(text2image):
    cfg = text2image.config
    assert list(cfg.stages) == ["stage-0", "stage-1"]                             # stage_id order
    steps = cfg.pipelines["default"].steps
    assert [(s.stage, s.input, s.output) for s in steps] == [("stage-0", "prompt", "text"),
                                                            ("stage-1", "text", "images")]
    assert cfg.stages["stage-1"].engine.max_batch_size == 4


def test_generate_stage_args_per_stage(text2image):
    a = text2image.generate([{"prompt": "a castle", "max_tokens": 6, "temperature": 0, "ignore_eos": True},
                             {"seed": 3}])
    b = text2image.generate([{"prompt": "a castle", "max_tokens": 6, "temperature": 0, "ignore_eos": True},
                             {"prompt": "a castle", "seed": 3}])
    assert len(a[0].outputs[0].token_ids) == 6 and a[0].outputs[0].finish_reason == "length"
    assert a[0].text == b[0].text
    assert a[1].images[0].size == (32, 32)                                       # dit_config's defaults
    assert a[1].images[0].tobytes() == b[1].images[0].tobytes()
    named = text2image.generate("default", "a castle", max_tokens=6, temperature=0, ignore_eos=True, seed=3,
                                size="32x32", num_inference_steps=2, use_tqdm=False)   # the pipeline by name
    assert named.text == a[0].text and named.images[0].tobytes() == a[1].images[0].tobytes()


@pytest.mark.parametrize("stage_args, param", [
    ([{"prompt": "x"}], "stage_args"),                                           # one dict per stage
    ([{"prompt": "x"}, {}, {}], "stage_args"),
    ([{"max_tokens": 3}, {}], "stage_args[0].prompt"),
    ([{"prompt": "x"}, {"prompt": "y"}], "stage_args[1].prompt"),              # a later stage takes text
    ([{"prompt": "x", "height": 64}, {}], "stage_args[0].height"),             # not an AR argument
    ([{"prompt": "x"}, {"temperature": 0.5}], "stage_args[1].temperature"),    # not a DiT argument
    ([{"prompt": "x", "nope": 1}, {}], "stage_args[0]"),
    ([{"prompt": "x"}, "y"], "stage_args"),                                    # dicts only
])
def test_bad_stage_args(text2image, stage_args, param):
    with pytest.raises(InvalidRequestError) as err:
        text2image.generate(stage_args)
    assert err.value.param == param
    assert text2image.generate([{"prompt": "ok", "max_tokens": 2}, {}])[1].images   # nothing broke


def test_async_omni_llm_yields_each_stage_as_it_ends():
    async def main():
        llm = AsyncOmniLLM([ar(0, out=("hidden_states",)),
                            dit(1, model="tiny:pixart-llm", inp=("hidden_states",),
                                dit_config={"num_inference_steps": 2, "height": 32, "width": 32})])
        try:
            seen, dit_forwards = [], []
            async for out in llm.generate([{"prompt": "a red fox"}, {"seed": 1}], request_id="r1"):
                seen.append(out)
                dit_forwards.append(llm.engine("stage-1").engine.runner.stats.forwards)
            enc, img = seen
            assert dit_forwards[0] == 0 < dit_forwards[1]   # the first stage's output came before the DiT ran
            assert enc.final_output_type == "hidden_states" and enc.request_id == img.request_id == "r1"
            assert enc.hidden_states.shape[1] == 64 and torch.isfinite(enc.hidden_states).all()
            assert img.images[0].size == (32, 32)
        finally:
            await llm.shutdown()

    asyncio.run(main())


# ----------------------------------------------------------------------------- what a stage list cannot say
@pytest.mark.parametrize("make, field", [
    (lambda: stages_to_config([ar(0), ar(0)]), "stage_id"),
    (lambda: stages_to_config([ar(0), dit(1, inp=("hidden_states",))]), "stages[1].input_modalities"),
    (lambda: stages_to_config([ar(0, out=("hidden_states",)), dit(1)]), "stages[1].input_modalities"),
    (lambda: stages_to_config([dit(0, inp=("hidden_states",))]), "stages[0].input_modalities"),
    (lambda: stages_to_config([dit(0), ar(1)]), "stages[1].input_modalities"),   # nothing takes images
    (lambda: stages_to_config([]), "stages"),
    (lambda: create_ar_stage_config(0, "tiny:qwen3", ["text"], ["image"]), "output_modalities"),
    (lambda: create_ar_stage_config(0, "tiny:qwen3", ["audio"], ["text"]), "input_modalities"),
    (lambda: create_ar_stage_config(0, "tiny:qwen3", ["text"], ["text", "image"]), "output_modalities"),
    (lambda: create_ar_stage_config(0, "tiny:qwen3", vllm_config=object()), "vllm_config"),
    (lambda: create_ar_stage_config(0, "tiny:qwen3", max_num_seqs=0), "max_num_seqs"),
    (lambda: dit(1, dit_config={"scheduler_type": "ddpm"}), "dit_config.scheduler_type"),
    (lambda: dit(1, dit_config={"use_diffusers": True}), "dit_config.use_diffusers"),
])
def test_config_errors_name_the_field(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert field in str(err.value)
