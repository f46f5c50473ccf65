"""Qwen-Image's joint attention under a caption mask as ragged (variable-length) attention over [image | text]
segments (``omni_ray/dit/families/ragged_attention.py``) equals the masked call on every real token; the engine
forced onto it gives the masked attention's latents, and leaves it for a mask with a hole."""

import pytest
import torch

import omni_ray.dit.families.qwen_image_block as qwen_image_block
from omni_ray.dit import DiffusionParams
from omni_ray.dit.families.ragged_attention import caption_segments, masked_reference, ragged_caption_attention
from omni_ray.dit.families.sdpa_choice import _matches
from tests.dit.conftest import make_engine, rel_diff


def _inputs(lengths, T, N, heads=3, d=16, device="cpu", dtype=torch.float32, seed=0):
    """q / k / v [B, H, N + T, d] over [image | text] (token-major memory, as the q / k / v kernel writes them)
    and the caption bias [B, 1, T]: row i's first lengths[i] caption tokens real, the rest padding."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(len(lengths), N + T, heads, d, generator=g).to(device, dtype).transpose(1, 2)
               for _ in range(3))
    bias = torch.zeros(len(lengths), 1, T, device=device, dtype=dtype)
    for i, n in enumerate(lengths):
        bias[i, :, n:] = -10000.0
    return q, k, v, bias


def _real(bias, N):
    """[B, N + T] bool: the image tokens and the real caption tokens."""
    return torch.cat([torch.ones(bias.shape[0], N, dtype=torch.bool, device=bias.device), bias[:, 0] == 0], 1)


def test_segments_are_each_rows_real_tokens_then_its_padding():
    _, _, _, bias = _inputs((3, 5, 0), 5, 7)
    assert caption_segments(bias, 7).tolist() == [0, 10, 12, 24, 24, 31, 36]     # a full caption: an empty pad


@pytest.mark.parametrize("lengths,T,N", [((5, 9, 9), 9, 24), ((1, 4), 12, 7), ((16,), 16, 40), ((0, 3), 3, 5)])
def test_ragged_equals_masked_call_on_the_real_tokens(lengths, T, N):
    q, k, v, bias = _inputs(lengths, T, N)
    ref = masked_reference(q, k, v, bias, T)
    out = ragged_caption_attention(q, k, v, bias, T)
    assert out.shape == ref.shape
    real = _real(bias, N)
    assert (out - ref).abs().transpose(1, 2)[real].max() < 1e-5


def test_the_choice_takes_ragged_only_where_it_matches():
    q, k, v, bias = _inputs((4, 9), 9, 12)
    assert _matches(ragged_caption_attention, [q, k, v], bias, 9)
    assert not _matches(lambda q, k, v, b, t: ragged_caption_attention(q, k, v, b, t) + 0.5, [q, k, v], bias, 9)

    def unsupported(*a):
        raise RuntimeError("no ragged kernel here")
    assert not _matches(unsupported, [q, k, v], bias, 9)


def _latents(eng, embeds, masks, counter):
    params = DiffusionParams(height=32, width=32, num_inference_steps=2, seed=0)
    counter.clear()
    reqs = [eng.add_request(None, params, prompt_embeds=e, prompt_mask=m, output_type="latent")
            for e, m in zip(embeds, masks)]
    while not all(r.is_finished for r in reqs):
        eng.step()
    return [r.images[0] for r in reqs]


def test_engine_ragged_equals_masked_attention(monkeypatch):
    """``attention_backend: ragged`` gives the masked call's latents for two captions of different lengths in
    one batch (ragged runs), and for a caption whose mask has a hole (it does not: its real tokens are not one
    run, so the masked call runs)."""
    calls = []
    orig = qwen_image_block.ragged_caption_attention
    monkeypatch.setattr(qwen_image_block, "ragged_caption_attention", lambda *a: calls.append(1) or orig(*a))
    ragged, ref = make_engine("tiny:qwen-image", attention_backend="ragged"), make_engine("tiny:qwen-image")
    dim = ragged.family.transformer.config.joint_attention_dim
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(n, dim, generator=g) for n in (5, 11)]
    plain = [None, None]
    holed = [None, torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1])]
    for masks, runs in ((plain, True), (holed, False)):
        got = _latents(ragged, embeds, masks, calls)
        assert bool(calls) == runs
        want = _latents(ref, embeds, masks, calls)
        assert not calls
        for a, b in zip(got, want):
            assert rel_diff(a, b) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lengths,T,N", [((40, 97, 128, 1), 128, 1024), ((70, 64), 64, 4096)])
def test_ragged_on_cudnn_equals_masked_call(lengths, T, N):
    """bf16 on cuDNN's variable-length kernel: on the real tokens as close to the fp32 masked call as torch's own
    masked bf16 call is (a full caption gives an empty padding segment)."""
    q, k, v, bias = _inputs(lengths, T, N, heads=24, d=128, device="cuda", dtype=torch.bfloat16)
    real = _real(bias, N)
    exact = masked_reference(q.float(), k.float(), v.float(), bias.float(), T).transpose(1, 2)[real]
    torch_bf16 = masked_reference(q, k, v, bias, T).float().transpose(1, 2)[real]
    out = ragged_caption_attention(q, k, v, bias, T).float().transpose(1, 2)[real]
    err, err_torch = (out - exact).abs().max().item(), (torch_bf16 - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-3, (err, err_torch)
