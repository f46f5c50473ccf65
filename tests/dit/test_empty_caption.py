"""A caption that tokenizes to nothing (a tokenizer that appends no EOS; the default negative
prompt "" under classifier-free guidance) runs, as in diffusers, instead of failing in the mask."""

import copy

import numpy as np
import pytest

from omni_ray.dit import DiffusionParams
from tests.dit.conftest import make_engine, run_one

PARAMS = dict(height=32, width=32, num_inference_steps=2, guidance_scale=4.5, seed=0)


@pytest.fixture(scope="module")
def no_eos():
    """The tiny PixArt whose tokenizer adds no EOS: "" has no tokens at all."""
    from tokenizers import processors

    eng = make_engine("tiny:pixart")
    tok = copy.deepcopy(eng.family.tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    eng.family.tokenizer = tok
    assert tok("").input_ids == [] and not any(tok(["", "a boat"], padding="longest").attention_mask[0])
    return eng


def finite_image(req) -> np.ndarray:
    img = np.asarray(req.images[0], dtype=np.float64)
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()
    return img


def test_default_negative_prompt_under_cfg(no_eos):
    """"" is encoded with the prompt (one padded batch): its mask is all zeros."""
    req = run_one(no_eos, "a red boat", DiffusionParams(**PARAMS))
    assert req.negative_prompt == "" and req.do_cfg
    finite_image(req)
    assert not no_eos.has_work()


def test_empty_negative_encoded_alone(no_eos):
    """With ready conditioning only "" goes through the text encoder: zero tokens wide."""
    embeds, mask = no_eos.encode_prompt("a green field")
    no_eos._neg_conds.clear()
    req = run_one(no_eos, None, DiffusionParams(**PARAMS), prompt_embeds=embeds[0], prompt_mask=mask[0])
    finite_image(req)
    again = run_one(no_eos, "a green field", DiffusionParams(**PARAMS))
    assert np.abs(finite_image(again) - finite_image(req)).max() <= 2      # same conditioning, same image
