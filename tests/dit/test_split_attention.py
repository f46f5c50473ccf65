"""Qwen-Image's joint attention under a caption mask, split into the unmasked image keys and the masked
caption keys and merged by log-sum-exp (``omni_ray/dit/families/split_attention.py``), equals the single
masked call."""

import pytest
import torch

from omni_ray.dit import DiffusionParams
from omni_ray.dit.families.split_attention import attention_lse, masked_reference, merge, split_caption_attention
from tests.dit.conftest import make_engine, rel_diff


def _inputs(lengths, T, N, heads=3, d=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(len(lengths), heads, T + N, d, generator=g).to(device, dtype) for _ in range(3))
    bias = torch.zeros(len(lengths), 1, T, device=device, dtype=dtype)
    for i, n in enumerate(lengths):
        bias[i, :, n:] = float("-inf")                    # a caption of n tokens padded to T
    return q, k, v, bias


@pytest.mark.parametrize("lengths,T,N", [((5, 9, 9), 9, 24), ((1, 4), 12, 7), ((16,), 16, 40)])
def test_split_equals_masked_call(lengths, T, N):
    q, k, v, bias = _inputs(lengths, T, N)
    ref = masked_reference(q, k, v, bias, T)
    out = split_caption_attention(q, k, v, bias, T)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-5


def test_lse_is_the_log_sum_exp_of_the_logits():
    q, k, v, bias = _inputs((3, 6), 6, 0, seed=1)
    out, lse = attention_lse(q, k, v, bias[:, None])
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias[:, None]
    assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-5)
    assert torch.allclose(out, torch.softmax(logits, -1) @ v, atol=1e-5)


def test_a_key_set_with_nothing_unmasked_adds_nothing():
    q, k, v, _ = _inputs((4,), 0, 10, seed=2)
    o1, l1 = attention_lse(q, k, v)
    o2, l2 = torch.full_like(o1, float("nan")), torch.full_like(l1, float("-inf"))   # every key masked
    assert torch.equal(merge(o1, l1, o2, l2), o1) and torch.equal(merge(o2, l2, o1, l1), o1)


def test_engine_split_equals_masked_attention():
    """The Qwen-Image engine forced onto the split (``attention_backend: split``) gives the latents of the
    single masked call, for two captions of different lengths in one batch (the split runs) and one alone
    (no mask: the split does not apply)."""
    split, ref = make_engine("tiny:qwen-image", attention_backend="split"), make_engine("tiny:qwen-image")
    dim = split.family.transformer.config.joint_attention_dim
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(n, dim, generator=g) for n in (5, 11)]
    params = DiffusionParams(height=32, width=32, num_inference_steps=2, seed=0)
    outs, ran = [], []
    for eng in (split, ref):
        calls = []
        orig = eng.family.kernels.merge
        eng.family.kernels.merge = lambda *a: calls.append(1) or orig(*a)
        reqs = [eng.add_request(None, params, prompt_embeds=e, output_type="latent") for e in embeds]
        while not all(r.is_finished for r in reqs):
            eng.step()
        outs.append([r.images[0] for r in reqs])
        ran.append(len(calls))
    assert ran[0] > 0 and ran[1] == 0
    for a, b in zip(*outs):
        assert rel_diff(a, b) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lengths,T,N", [((40, 97, 128, 1), 128, 1024), ((70, 64), 64, 4096)])
def test_split_on_cudnn_equals_masked_call(lengths, T, N):
    """bf16 on cuDNN (both pieces and the log-sum-exp it returns): as close to the fp32 masked call as torch's
    own masked bf16 call is, and equal to it within bf16 rounding."""
    q, k, v, bias = _inputs(lengths, T, N, heads=24, d=128, device="cuda", dtype=torch.bfloat16)
    exact = masked_reference(q.float(), k.float(), v.float(), bias.float(), T)
    torch_bf16 = masked_reference(q, k, v, bias, T).float()
    out = split_caption_attention(q, k, v, bias, T).float()
    compiled = split_caption_attention(q, k, v, bias, T, torch.compile(merge)).float()
    err, err_torch = (out - exact).abs().max().item(), (torch_bf16 - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-3, (err, err_torch)
    assert (compiled - out).abs().max().item() <= 2 * err_torch + 1e-3


def test_kernels_are_timed_on_the_batchs_rows_within_a_budget():
    from omni_ray.dit.families.sdpa_choice import timed_rows

    assert timed_rows(16, 1152) == 16                 # 512 px, 8 requests with negatives: their own rows
    assert timed_rows(16, 4224) == 15 and timed_rows(2, 4224) == 2
    assert timed_rows(8, 32760) == 2 and timed_rows(4, 100_000) == 1
