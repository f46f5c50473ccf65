"""The AR-conditioned variant: a PixArt transformer captioned by an LLM's prompt hidden states."""

import numpy as np
import pytest
import torch

from omni_ray.dit import DiffusionParams
from omni_ray.errors import InvalidRequestError
from tests.dit.conftest import max_diff, pixart_pipeline


def P(**kw):
    return DiffusionParams(height=32, width=32, num_inference_steps=4, seed=kw.pop("seed", 0), **kw)


def test_runs_from_the_ar_models_hidden_states(pixart_llm):
    from omni_ray.ar import LLM

    llm = LLM("tiny:qwen3", enforce_eager=True, device="cpu", kvcache_block_size=16, num_kvcache_blocks=64,
              max_model_len=256)
    hidden = llm.encode(["a red fox in the snow", "a lighthouse at dusk"])
    assert hidden[0].shape[1] == pixart_llm.family.caption_dim == 64
    imgs = pixart_llm.generate(None, P(), prompt_embeds=hidden, use_tqdm=False)
    assert len(imgs) == 2 and imgs[0].size == (32, 32)
    a, b = (np.asarray(im, dtype=np.float64) for im in imgs)
    assert np.abs(a - b).mean() > 1.0                      # the conditioning matters


def test_equals_pipeline_with_the_same_embeddings(pixart_llm):
    """Same as PixArtSigmaPipeline fed prompt_embeds, with the engine's unconditional caption (one
    zero token) as negative_prompt_embeds."""
    torch.manual_seed(0)
    T = 7
    embeds = torch.randn(T, 64)
    mask = torch.ones(T, dtype=torch.long)
    mask[5:] = 0                                            # right padding, masked
    ours = pixart_llm.generate(None, P(guidance_scale=4.5, seed=2), prompt_embeds=embeds, prompt_mask=mask,
                               output_type="np", use_tqdm=False)
    neg = torch.zeros(1, T, 64)
    neg_mask = torch.zeros(1, T, dtype=torch.long)
    neg_mask[0, 0] = 1
    ref = pixart_pipeline(pixart_llm)(
        prompt=None, negative_prompt=None, prompt_embeds=embeds[None], prompt_attention_mask=mask[None],
        negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask, height=32, width=32,
        num_inference_steps=4, guidance_scale=4.5, generator=torch.Generator().manual_seed(2),
        use_resolution_binning=False, output_type="np").images
    assert max_diff(ours, ref) < 1e-4


def test_masked_padding_changes_nothing(pixart_llm):
    torch.manual_seed(1)
    embeds = torch.randn(5, 64)
    padded = torch.cat([embeds, torch.randn(3, 64)])
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])
    a = pixart_llm.generate(None, P(), prompt_embeds=embeds, output_type="latent", use_tqdm=False)[0]
    b = pixart_llm.generate(None, P(), prompt_embeds=padded, prompt_mask=mask, output_type="latent",
                            use_tqdm=False)[0]
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())


@pytest.mark.parametrize("kw, param, match", [
    (dict(), "prompt_embeds", "no text encoder"),
    (dict(prompt_embeds=torch.randn(4, 32)), "prompt_embeds", "hidden size is 32; this model takes 64"),
    (dict(prompt_embeds=torch.randn(4)), "prompt_embeds", r"shape \[T, H\]"),
    (dict(prompt_embeds=torch.randn(2, 3, 64)), "prompt_embeds", r"shape \[T, H\]"),
    (dict(prompt_embeds=torch.ones(4, 64, dtype=torch.long)), "prompt_embeds", "floating-point"),
    (dict(prompt_embeds=torch.full((4, 64), float("nan"))), "prompt_embeds", "NaN"),
    (dict(prompt_embeds=torch.randn(2000, 64)), "prompt_embeds", "limit is 1024"),
    (dict(prompt_embeds=torch.randn(4, 64), prompt_mask=torch.ones(3)), "prompt_mask", "shape"),
    (dict(prompt_embeds=torch.randn(4, 64), prompt_mask=torch.zeros(4)), "prompt_mask", "at least one"),
    (dict(prompt_embeds=torch.randn(4, 64), prompt_mask=torch.full((4,), 2)), "prompt_mask", "0/1"),
    (dict(prompt_mask=torch.ones(4)), "prompt_mask", "without prompt_embeds"),
])
def test_bad_conditioning(pixart_llm, kw, param, match):
    with pytest.raises(InvalidRequestError, match=match) as err:
        pixart_llm.make_request("text is not enough", P(), **kw)
    assert err.value.param == param and err.value.http_status == 400


def test_no_text_side_features(pixart_llm):
    with pytest.raises(InvalidRequestError, match="negative_prompt"):
        pixart_llm.make_request(None, P(negative_prompt="blurry"), prompt_embeds=torch.randn(3, 64))
    with pytest.raises(InvalidRequestError, match="no text encoder"):
        pixart_llm.encode_prompt("a cat")
