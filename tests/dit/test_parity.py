"""With caching off, the engine's images equal the diffusers pipelines' (same components, seed,
scheduler and steps; fp32)."""

import numpy as np
import pytest
import torch

from omni_ray.dit import DiffusionParams
from tests.dit.conftest import max_diff, pixart_pipeline, rel_diff, sd3_pipeline

TOL = 1e-4        # on [0, 1] images


@pytest.mark.parametrize("guidance, n, negative", [(4.5, 2, "blurry, low quality"), (1.0, 1, None)])
def test_pixart_equals_pipeline(pixart, guidance, n, negative):
    params = DiffusionParams(height=32, width=48, num_inference_steps=5, guidance_scale=guidance, seed=7,
                             negative_prompt=negative, num_images_per_prompt=n)
    ours = pixart.generate("A red fox in the snow", params, output_type="np", use_tqdm=False)
    ref = pixart_pipeline(pixart)(
        "A red fox in the snow", negative_prompt=negative or "", height=32, width=48, num_inference_steps=5,
        guidance_scale=guidance, num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(7),
        use_resolution_binning=False, clean_caption=False, output_type="np").images
    assert len(ours) == n and ours[0].shape == ref[0].shape == (32, 48, 3)
    assert 0.01 < float(np.std(ref)) and max_diff(ours, ref) < TOL
    if n > 1:
        assert max_diff(ours[:1], ours[1:]) > 0.01          # the images of one prompt differ


def test_pixart_latents_equal_pipeline(pixart):
    params = DiffusionParams(height=32, width=32, num_inference_steps=4, guidance_scale=3.0, seed=11)
    ours = pixart.generate("a lighthouse at dusk", params, output_type="latent", use_tqdm=False)[0]
    ref = pixart_pipeline(pixart)("a lighthouse at dusk", height=32, width=32, num_inference_steps=4,
                                  guidance_scale=3.0, generator=torch.Generator().manual_seed(11),
                                  use_resolution_binning=False, clean_caption=False,
                                  output_type="latent").images[0]
    assert rel_diff(ours, ref) < 1e-5


def test_sd3_equals_pipeline(sd3):
    params = DiffusionParams(height=48, width=32, num_inference_steps=5, guidance_scale=5.0, seed=3,
                             negative_prompt="ugly", num_images_per_prompt=2)
    ours = sd3.generate("An astronaut riding a horse", params, output_type="np", use_tqdm=False)
    ref = sd3_pipeline(sd3)("An astronaut riding a horse", negative_prompt="ugly", height=48, width=32,
                            num_inference_steps=5, guidance_scale=5.0, num_images_per_prompt=2,
                            generator=torch.Generator().manual_seed(3), max_sequence_length=32,
                            output_type="np").images
    assert ours[0].shape == ref[0].shape == (48, 32, 3)
    assert 0.01 < float(np.std(ref)) and max_diff(ours, ref) < TOL


@pytest.mark.parametrize("engine_name", ["pixart", "sd3"])
def test_encoded_conditioning_reproduces_text_path(engine_name, request):
    """encode_prompt -> prompt_embeds/prompt_mask skips the text encoder with the same result."""
    eng = request.getfixturevalue(engine_name)
    params = DiffusionParams(height=32, width=32, num_inference_steps=3, seed=5)
    prompts = ["a bowl of ramen", "a castle on a cliff above the sea, at night"]
    embeds, mask = eng.encode_prompt(prompts)
    assert embeds.shape[:2] == mask.shape and embeds.shape[2] == eng.family.caption_dim
    assert embeds.device.type == "cpu" and embeds.dtype == torch.float32
    by_text = eng.generate(prompts, params, output_type="np", use_tqdm=False)
    by_embeds = eng.generate(None, params, prompt_embeds=embeds, prompt_mask=mask, output_type="np",
                             use_tqdm=False)
    assert max_diff(by_text, by_embeds) < 1e-5


def test_pil_output(pixart):
    imgs = pixart.generate(["a cat", "a dog"], DiffusionParams(height=32, width=32, num_inference_steps=2, seed=0),
                           use_tqdm=False)
    assert [im.size for im in imgs] == [(32, 32), (32, 32)] and imgs[0].mode == "RGB"
    arr = pixart.generate("a cat", DiffusionParams(height=32, width=32, num_inference_steps=2, seed=0),
                          output_type="np", use_tqdm=False)[0]
    assert np.abs(np.asarray(imgs[0]) / 255.0 - arr).max() <= 0.5 / 255 + 1e-6
