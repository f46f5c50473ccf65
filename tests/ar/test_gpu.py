"""CUDA paths: Triton paged attention against the PyTorch reference, CUDA graphs against eager."""

import pytest
import torch

from omni_ray.ar import SamplingParams
from omni_ray.ar.layers.attention import AttnMetadata, _torch_decode, _torch_prefill
from tests.ar.conftest import PROMPTS, make_llm

pytestmark = pytest.mark.gpu


def _paged(ctx_lens, bs, hk, d, dtype, extra_blocks=7):
    n_blocks = sum(-(-c // bs) for c in ctx_lens) + extra_blocks
    k = torch.randn(n_blocks, bs, hk, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    perm = torch.randperm(n_blocks, device="cuda").int()          # scattered, non-contiguous blocks
    width = max(-(-c // bs) for c in ctx_lens)
    table, i = torch.zeros(len(ctx_lens), width, dtype=torch.int32, device="cuda"), 0
    for r, c in enumerate(ctx_lens):
        nb = -(-c // bs)
        table[r, :nb] = perm[i:i + nb]
        i += nb
    return k, v, table


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bs,hq,hk,d", [(16, 4, 2, 32), (256, 16, 8, 128), (64, 8, 1, 64)])
@pytest.mark.parametrize("splits", [1, 4])
def test_triton_decode_matches_torch(dtype, tol, bs, hq, hk, d, splits):
    from omni_ray.ar.layers.triton_attention import paged_decode
    torch.manual_seed(0)
    ctx = [1, 17, 300, 1000, bs, 5 * bs + 3]
    k, v, table = _paged(ctx, bs, hk, d, dtype)
    cl = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(len(ctx), hq, d, device="cuda", dtype=dtype)
    want = _torch_decode(q, k, v, table, cl, d ** -0.5)
    got = paged_decode(q, k, v, table, cl, d ** -0.5, splits)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bs,hq,hk,d", [(16, 4, 2, 32), (256, 16, 8, 128)])
def test_triton_prefill_matches_torch(dtype, tol, bs, hq, hk, d):
    from omni_ray.ar.layers.triton_attention import paged_prefill
    torch.manual_seed(0)
    q_lens, ctx = [5, 130, 1, 64, 200], [5, 300, 40, 64, 1200]        # cached prefixes and chunks
    k, v, table = _paged(ctx, bs, hk, d, dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), hq, d, device="cuda", dtype=dtype)
    meta = AttnMetadata(slot_mapping=None, context_lens=torch.tensor(ctx, dtype=torch.int32, device="cuda"),
                        block_tables=table, cu_seqlens_q=cu, num_decodes=0, q_lens=q_lens, ctx_lens=ctx)
    want = _torch_prefill(q, k, v, meta, d ** -0.5)
    got = paged_prefill(q, k, v, table, meta.context_lens, cu, max(q_lens), d ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_cuda_graph_engine_matches_cpu_engine():
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cpu = [o["token_ids"] for o in make_llm("tiny:qwen2").generate(PROMPTS, params, use_tqdm=False)]
    gpu = make_llm("tiny:qwen2", device="cuda", dtype="float32", enforce_eager=False)
    assert gpu.runner.graphs, "decode CUDA graphs were not captured"
    got = [o["token_ids"] for o in gpu.generate(PROMPTS, params, use_tqdm=False)]
    assert got == cpu


def test_triton_store_kv_matches_index_copy():
    from omni_ray.ar.layers.attention import store_kv
    from omni_ray.ar.layers.triton_attention import store_kv as triton_store_kv
    k = torch.randn(37, 3, 40, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(10 * 16, device="cuda")[:37]
    ref_k, ref_v = torch.zeros(10, 16, 3, 40, device="cuda", dtype=torch.bfloat16), None
    ref_v = torch.zeros_like(ref_k)
    got_k, got_v = torch.full_like(ref_k, 7.0), torch.full_like(ref_k, 7.0)
    ref_k.fill_(7.0), ref_v.fill_(7.0)
    store_kv(k, v, ref_k, ref_v, slots)
    triton_store_kv(k, v, got_k, got_v, slots)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
