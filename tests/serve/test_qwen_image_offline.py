"""Qwen-Image through ``OmniLLM`` (the text encoder on the AR engine, the MMDiT + VAE on the DiT
engine, the same runner as the Serve app) against diffusers' own pipelines end to end: the same
tiny checkpoint, float32 on the CPU, the same seed, step caching off."""

import numpy as np
import pytest
import torch
from PIL import Image

from omni_ray import OmniLLM
from omni_ray.testing import resolve_model

STEPS, SIZE, SEED = 2, (64, 48), 3            # (height, width)


def _stages(name: str, path: str) -> dict:
    return {f"{name}-encoder": {"kind": "ar", "engine": {
                "model": {"path": path}, "device": "cpu", "enforce_eager": True, "cache": {"num_blocks": 64},
                "scheduler": {"max_num_batched_tokens": 1024, "max_num_seqs": 4, "max_model_len": 1024}}},
            name: {"kind": "dit", "engine": {"model": {"path": path}, "device": "cpu"}}}


@pytest.fixture(scope="module")
def omni():
    cfg = {"stages": _stages("qwen-image", "tiny:qwen-image") | _stages("qwen-image-edit", "tiny:qwen-image-edit"),
           "pipelines": {n: {"graph": {"model": n, "stages": {"text_encoder": f"{n}-encoder"}}}
                         for n in ("qwen-image", "qwen-image-edit")}}
    with OmniLLM(cfg) as o:
        yield o


def _diffusers(cls_name: str, spec: str):
    import diffusers

    path = resolve_model(spec)
    kw = {}
    if (path / "processor").is_dir():      # the processor's PIL backend (the pinned CPU torch has no torchvision)
        from tests.ar.test_mm_encoders import auto_processor
        kw["processor"] = auto_processor(path / "processor")
    pipe = getattr(diffusers, cls_name).from_pretrained(str(path), dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _ours(omni, name, prompt, negative, **kw):
    out = omni.generate(name, prompt, use_tqdm=False, size=f"{SIZE[1]}x{SIZE[0]}", num_inference_steps=STEPS,
                        seed=SEED, guidance_scale=4.0, **({"negative_prompt": negative} if negative else {}), **kw)
    return out


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_text_to_image_equals_diffusers(omni, negative):
    prompt = "a red fox in the snow"
    out = _ours(omni, "qwen-image", prompt, negative)
    ref = _diffusers("QwenImagePipeline", "tiny:qwen-image")(
        prompt, negative_prompt=negative, true_cfg_scale=4.0, height=SIZE[0], width=SIZE[1],
        num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="pil").images[0]
    assert out.images[0].size == ref.size == (SIZE[1], SIZE[0])
    np.testing.assert_allclose(_pixels(out.images[0]), _pixels(ref), atol=1.5 / 255)   # uint8 rounding
    enc = out.stages[0]
    assert ("negative" in enc) == (negative is not None)          # encoded beside the prompt only under true CFG


def test_edit_equals_diffusers(omni):
    src = Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8))
    prompt, negative = "make the sky blue", " "
    out = _ours(omni, "qwen-image-edit", prompt, negative, image=src)
    ref = _diffusers("QwenImageEditPipeline", "tiny:qwen-image-edit")(
        src, prompt, negative_prompt=negative, true_cfg_scale=4.0, height=SIZE[0], width=SIZE[1],
        num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="pil").images[0]
    np.testing.assert_allclose(_pixels(out.images[0]), _pixels(ref), atol=1.5 / 255)
    with pytest.raises(Exception, match="give the input image"):
        omni.generate("qwen-image-edit", prompt, use_tqdm=False)
