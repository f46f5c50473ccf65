"""Bad input raises InvalidRequestError (400, naming the parameter) before any work, and leaves
other requests alone."""

import pytest
import torch

from omni_ray.dit import DiffusionParams
from omni_ray.errors import InvalidRequestError
from tests.dit.conftest import make_engine


@pytest.mark.parametrize("kw, param", [
    (dict(height=30), "height"),                       # stride is 8 (VAE x4, patch 2)
    (dict(width=100), "width"),
    (dict(height=0), "height"),
    (dict(height=2048, width=2048), "size"),           # over max_pixels
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=101), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(seed=-3), "seed"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(num_images_per_prompt=5), "num_images_per_prompt"),    # over max_images_per_prompt
    (dict(negative_prompt=3), "negative_prompt"),
    (dict(cache={"method": "deepcache", "threshold": 0.1}), "cache.method"),
])
def test_bad_params(pixart, kw, param):
    steps0 = pixart.runner.stats.forwards
    with pytest.raises(InvalidRequestError) as err:      # from DiffusionParams itself or from the engine
        pixart.make_request("a cat", DiffusionParams(**kw))
    assert err.value.param == param and err.value.http_status == 400
    assert err.value.to_openai()["error"]["type"] == "invalid_request_error"
    assert pixart.runner.stats.forwards == steps0 and not pixart.has_work()


@pytest.mark.parametrize("prompt", ["", "   ", None, 5])
def test_bad_prompt(pixart, prompt):
    with pytest.raises(InvalidRequestError) as err:
        pixart.make_request(prompt, DiffusionParams())
    assert err.value.param == "prompt"


def test_sd3_size_limit_and_embeds(sd3):
    limit = sd3.family.max_size
    with pytest.raises(InvalidRequestError, match="at most"):
        sd3.make_request("a cat", DiffusionParams(height=limit + sd3.family.stride, width=32))
    with pytest.raises(InvalidRequestError, match="pooled row"):
        sd3.make_request(None, DiffusionParams(), prompt_embeds=torch.randn(1, sd3.family.caption_dim))
    with pytest.raises(InvalidRequestError, match="all ones"):
        sd3.make_request(None, DiffusionParams(), prompt_embeds=torch.randn(5, sd3.family.caption_dim),
                         prompt_mask=torch.tensor([1, 1, 1, 1, 0]))


def test_duplicate_request_id_and_bad_params_object(pixart):
    req = pixart.add_request("a cat", DiffusionParams(height=32, width=32, num_inference_steps=2), request_id="dup")
    with pytest.raises(InvalidRequestError, match="already in use"):
        pixart.make_request("a dog", DiffusionParams(), request_id="dup")
    with pytest.raises(InvalidRequestError):
        pixart.make_request("a dog", {"height": 32})
    while not req.is_finished:
        pixart.step()


def test_a_bad_request_does_not_disturb_others():
    eng = make_engine("tiny:pixart")
    good = eng.add_request("a cat", DiffusionParams(height=32, width=32, num_inference_steps=3, seed=0))
    eng.step()
    with pytest.raises(InvalidRequestError):
        eng.add_request("a dog", DiffusionParams(height=33, width=32))
    while not good.is_finished:
        eng.step()
    assert len(good.images) == 1 and eng.engine_stats()["requests_finished"] == 1


def test_defaults_come_from_the_family(pixart, sd3):
    r = pixart.make_request("a cat")
    assert (r.height, r.width, r.num_steps, r.guidance_scale) == (32, 32, 20, 4.5)
    r = sd3.make_request("a cat")
    assert (r.num_steps, r.guidance_scale) == (28, 7.0)
    assert pixart.make_request("a", DiffusionParams(seed=None)).seed != pixart.make_request("a").seed


def test_config_defaults_for_size_and_steps():
    """``default_size`` / ``default_steps`` fill what a request leaves out; the request's own win."""
    eng = make_engine("tiny:pixart", default_size="64x32", default_steps=3)
    r = eng.make_request("a cat", DiffusionParams())
    assert (r.height, r.width, r.num_steps) == (32, 64, 3)
    r = eng.make_request("a cat", DiffusionParams(height=16, width=24, num_inference_steps=5))
    assert (r.height, r.width, r.num_steps) == (16, 24, 5)


def test_fit_pixels_keeps_the_aspect_ratio_under_the_limit():
    from omni_ray.dit.validation import fit_pixels

    assert fit_pixels(1024, 1024, 1 << 20, 16) == (1024, 1024)
    h, w = fit_pixels(768, 1344, 262144, 16)                       # an edit's 1 MP default on a 0.25 MP engine
    assert h * w <= 262144 and h % 16 == 0 and w % 16 == 0 and abs(w / h - 1344 / 768) < 0.1
