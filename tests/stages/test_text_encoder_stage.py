"""The AR stage as Qwen-Image's text encoder (the serving path: ``ARStageEngine.encode`` of an
``ARRequest`` with a ``TextEncoding``): equal to diffusers' ``encode_prompt``, a prompt and its
negative prompt in one engine step, the template from the prefix cache, bad requests refused."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
import torch

from omni_ray.ar.text_encoding import QWEN_IMAGE, QWEN_IMAGE_EDIT
from omni_ray.config import ARStageConfig, LimitsConfig, validate
from omni_ray.errors import InvalidRequestError
from omni_ray.stages import ARRequest
from omni_ray.stages.ar import ARStageEngine
from omni_ray.testing import resolve_model
from tests.ar.test_text_encoding import edit_pipeline, image, pipeline_image, reference_rows, t2i_pipeline

PROMPT, NEGATIVE = "a red fox in the snow at dawn, soft light", "blurry"


def stage(model: str, core_process: str, max_prompt_tokens: int = 300) -> ARStageEngine:
    engine = {"model": {"path": model}, "enforce_eager": True, "device": "cpu", "core_process": core_process,
              "cache": {"block_size": 8, "num_blocks": 128}, "scheduler": {"max_model_len": 512}}
    cfg = validate(ARStageConfig, {"engine": engine}).engine
    eng = ARStageEngine(cfg, LimitsConfig(max_prompt_tokens=max_prompt_tokens))
    eng.start()
    return eng


def test_prompt_and_negative_in_one_step_equal_diffusers_then_the_template_is_cached():
    pipe = t2i_pipeline(resolve_model("tiny:qwen-image"))
    want = reference_rows(*(t.detach() if t is not None else None for t in pipe.encode_prompt([PROMPT, NEGATIVE])))

    async def main():
        eng = stage("tiny:qwen-image", core_process="off")   # adds of one loop turn start together (ProcessCore too)
        try:
            assert eng.text_encoding is QWEN_IMAGE                         # the recipe of the model's pipeline
            s0 = eng.engine.stats()
            got = await eng.encode_batch([ARRequest(f"q-{i}", prompt=p, encoding=QWEN_IMAGE)
                                          for i, p in enumerate((PROMPT, NEGATIVE))])
            s1 = eng.engine.stats()
            again = await eng.encode(ARRequest("q-2", prompt=PROMPT, encoding=QWEN_IMAGE))
            s2 = eng.engine.stats()
            return got, again, s0, s1, s2
        finally:
            await eng.shutdown()

    (pos, neg), again, s0, s1, s2 = asyncio.run(main())
    for g, w in zip((pos, neg), want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert s1["steps"] - s0["steps"] == 1 and s1["max_batch_size"] == 2        # both prompts in one step
    assert s1["prefix_cache_hit_tokens"] == s0["prefix_cache_hit_tokens"]      # nothing cached before it
    cached = QWEN_IMAGE.drop_tokens // 8 * 8
    assert s2["prefix_cache_hit_tokens"] - s1["prefix_cache_hit_tokens"] == cached
    torch.testing.assert_close(again, pos, atol=1e-5, rtol=1e-5)               # a hit equals the miss


def test_edit_takes_the_users_image_as_sent_and_equals_diffusers():
    path = resolve_model("tiny:qwen-image-edit")
    pipe = edit_pipeline(path)
    img = image(80, 48, seed=7)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    sent = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    embeds, mask = pipe.encode_prompt("make the sky purple", image=pipeline_image(pipe, img))
    (want,) = reference_rows(embeds.detach(), mask)

    async def main():
        eng = stage("tiny:qwen-image-edit", core_process="off")
        try:
            assert eng.text_encoding is QWEN_IMAGE_EDIT
            req = ARRequest("e-1", prompt="make the sky purple", multi_modal_data={"image": sent},
                            encoding=QWEN_IMAGE_EDIT)
            got = await eng.encode(req)
            with pytest.raises(InvalidRequestError) as err:                    # the edit recipe needs its image
                await eng.encode(ARRequest("e-2", prompt="make it blue", encoding=QWEN_IMAGE_EDIT))
            assert err.value.param == "image"
            return got
        finally:
            await eng.shutdown()

    torch.testing.assert_close(asyncio.run(main()), want, atol=1e-4, rtol=1e-4)


def test_bad_text_encoder_requests_are_invalid_and_the_stage_goes_on():
    async def main():
        eng = stage("tiny:qwen-image", core_process="off")
        try:
            with pytest.raises(InvalidRequestError) as err:                    # an image template, no vision input
                await eng.encode(ARRequest("b-1", prompt="make it blue", multi_modal_data={"image": image(32, 32)},
                                           encoding=QWEN_IMAGE_EDIT))
            assert err.value.param == "image"
            with pytest.raises(InvalidRequestError) as err:                    # over app.limits.max_prompt_tokens
                await eng.encode(ARRequest("b-2", prompt="fox " * 400, encoding=QWEN_IMAGE))
            assert err.value.param == "prompt"
            return await eng.encode(ARRequest("b-3", prompt="a fox", encoding=QWEN_IMAGE))
        finally:
            await eng.shutdown()

    assert asyncio.run(main()).ndim == 2
    for bad, param in (({"messages": [{"role": "user", "content": "hi"}]}, "prompt"),
                       ({"prompt": "a fox", "system_prompt": "be brief"}, "prompt"),
                       ({"prompt": "a fox", "multi_modal_data": {"audio": b"x"}}, "multi_modal_data")):
        with pytest.raises(InvalidRequestError) as err:
            ARRequest("b-4", encoding=QWEN_IMAGE, **bad)
        assert err.value.param == param
    with pytest.raises(InvalidRequestError) as err:
        ARRequest("b-5", prompt="a fox", encoding={"template": "{}"})
    assert err.value.param == "encoding"


def test_the_digest_keys_the_recipe_and_the_image_content():
    a = ARRequest("d-1", prompt="make it blue", multi_modal_data={"image": image(32, 32, seed=1)},
                  encoding=QWEN_IMAGE_EDIT)
    same = ARRequest("d-2", prompt="make it blue", multi_modal_data={"image": image(32, 32, seed=1)},
                     encoding=QWEN_IMAGE_EDIT)
    other = ARRequest("d-3", prompt="make it blue", multi_modal_data={"image": image(32, 32, seed=2)},
                      encoding=QWEN_IMAGE_EDIT)
    assert a.input_digest() == same.input_digest() != other.input_digest()
    assert ARRequest("d-4", prompt="a fox", encoding=QWEN_IMAGE).input_digest() != \
        ARRequest("d-5", prompt="a fox").input_digest()
