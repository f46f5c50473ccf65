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
    from omni_ray.ar.kernels.triton_attention import paged_decode
    torch.manual_seed(0)
    ctx = [1, 17, 300, 1000, bs, 5 * bs + 3]
    k, v, table = _paged(ctx, bs, hk, d, dtype)
    cl = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(len(ctx), hq, d, device="cuda", dtype=dtype)
    want = _torch_decode(q, k, v, table, cl, d ** -0.5)
    got = paged_decode(q, k, v, table, cl, d ** -0.5, splits)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("splits", [2, 16])
def test_triton_decode_merge_in_kernel(splits):
    """The split merge done by the last split's program (``locks``) equals the two-kernel merge,
    leaves the counters at zero, and stays right when replayed in a CUDA graph."""
    from omni_ray.ar.kernels.triton_attention import paged_decode
    torch.manual_seed(0)
    ctx, bs, hq, hk, d = [1, 17, 300, 1000, 5 * 256 + 3], 256, 16, 8, 128
    k, v, table = _paged(ctx, bs, hk, d, torch.bfloat16)
    cl = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(len(ctx), hq, d, device="cuda", dtype=torch.bfloat16)
    want = paged_decode(q, k, v, table, cl, d ** -0.5, splits)
    locks = torch.zeros(len(ctx) * hk, dtype=torch.int32, device="cuda")
    for _ in range(2):
        got = paged_decode(q, k, v, table, cl, d ** -0.5, splits, locks=locks)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
        assert not locks.any()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = paged_decode(q, k, v, table, cl, d ** -0.5, splits, locks=locks)
    for _ in range(3):
        got.zero_()
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert not locks.any()


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bs,hq,hk,d", [(16, 4, 2, 32), (256, 16, 8, 128)])
def test_triton_prefill_matches_torch(dtype, tol, bs, hq, hk, d, flat):
    """Against PyTorch attention; ``flat``: the grid the mixed-step graphs use (a table of the query
    blocks that exist, idle programs after them)."""
    from omni_ray.ar.kernels.tiling import prefill_block_m
    from omni_ray.ar.kernels.triton_attention import paged_prefill
    torch.manual_seed(0)
    q_lens, ctx = [5, 130, 1, 64, 200], [5, 300, 40, 64, 1200]        # cached prefixes and chunks
    k, v, table = _paged(ctx, bs, hk, d, dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), hq, d, device="cuda", dtype=dtype)
    meta = AttnMetadata(slot_mapping=None, context_lens=torch.tensor(ctx, dtype=torch.int32, device="cuda"),
                        block_tables=table, cu_seqlens_q=cu, num_decodes=0, q_lens=q_lens, ctx_lens=ctx)
    want = _torch_prefill(q, k, v, meta, d ** -0.5)
    qb = None
    if flat:
        m = prefill_block_m(d)
        codes = [(j << 16) | b for j, n in enumerate(q_lens) for b in range(-(-n // m))] + [-1] * 7
        qb = torch.tensor(codes, dtype=torch.int32, device="cuda")
    got = paged_prefill(q, k, v, table, meta.context_lens, cu, max(q_lens), d ** -0.5, q_blocks=qb)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("merge", ["kernel", "launch"])
def test_cuda_graph_engine_matches_cpu_engine(merge):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cpu = [o["token_ids"] for o in make_llm("tiny:qwen2").generate(PROMPTS, params, use_tqdm=False)]
    gpu = make_llm("tiny:qwen2", device="cuda", dtype="float32", enforce_eager=False, decode_merge=merge)
    assert gpu.runner.graphs, "decode CUDA graphs were not captured"
    assert (gpu.runner.decode_locks is not None) == (merge == "kernel")
    got = [o["token_ids"] for o in gpu.generate(PROMPTS, params, use_tqdm=False)]
    assert got == cpu


def test_triton_store_kv_matches_index_copy():
    from omni_ray.ar.kernels.triton_attention import store_kv as triton_store_kv
    from omni_ray.ar.layers.attention import store_kv
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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_fused_qkv_norm_rope_store_matches_ops(dtype, tol, qk_norm):
    from omni_ray.ar.kernels.triton_qkv import qkv_norm_rope_store
    from omni_ray.ar.layers.attention import store_kv
    from omni_ray.ar.layers.ops import qkv_norm_rope, rope_cos_sin
    torch.manual_seed(0)
    nh, nkv, d, n = 16, 8, 128, 37
    cos, sin = (t.cuda() for t in rope_cos_sin(d, 4096, {"rope_theta": 1e6}))
    pos = torch.randint(0, 4096, (n,), device="cuda")
    qkv = torch.randn(n, (nh + 2 * nkv) * d, device="cuda", dtype=dtype)
    qw, kw = (torch.rand(d, device="cuda", dtype=dtype) + 0.5 for _ in range(2)) if qk_norm else (None, None)
    slots = torch.randperm(20 * 16, device="cuda")[:n]
    q_ref, k_ref, v_ref = qkv_norm_rope(qkv, cos[pos], sin[pos], nh, nkv, d, qw, kw, 1e-6)
    kc_ref, vc_ref = torch.zeros(20, 16, nkv, d, device="cuda", dtype=dtype), None
    vc_ref = torch.zeros_like(kc_ref)
    store_kv(k_ref, v_ref, kc_ref, vc_ref, slots)
    kc, vc = torch.zeros_like(kc_ref), torch.zeros_like(kc_ref)
    q = qkv_norm_rope_store(qkv, pos.int(), cos, sin, nh, nkv, d, qw, kw, 1e-6, kc, vc, slots.int())
    torch.testing.assert_close(q.float(), q_ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(kc.float(), kc_ref.float(), atol=tol, rtol=tol)
    assert torch.equal(vc, vc_ref)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("h", [1024, 896, 128])
def test_triton_row_ops_match_ops(dtype, tol, h):
    """The Triton norm / add-norm / SiLU-and-mul against the plain PyTorch ops (HF's numerics);
    odd sizes (896: not a power of two) and a strided input (a column slice) included."""
    from omni_ray.ar.kernels import triton_norm
    from omni_ray.ar.layers import ops
    torch.manual_seed(0)
    x = torch.randn(37, 2 * h, device="cuda", dtype=dtype)[:, :h]          # row stride 2h
    r = torch.randn(37, h, device="cuda", dtype=dtype)
    w = torch.rand(h, device="cuda", dtype=dtype) + 0.5
    torch.testing.assert_close(triton_norm.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6), atol=tol, rtol=tol)
    y, res = triton_norm.add_rms_norm(x, r, w, 1e-6)
    y_ref, res_ref = ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(res, res_ref)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    gu = torch.randn(37, 2 * h, device="cuda", dtype=dtype)
    torch.testing.assert_close(triton_norm.silu_and_mul(gu), ops.silu_and_mul(gu), atol=tol, rtol=tol)
    empty = torch.empty(0, h, device="cuda", dtype=dtype)
    assert triton_norm.rms_norm(empty, w, 1e-6).shape == (0, h)


@pytest.mark.parametrize("elementwise,mixed", [("triton", 2048), ("triton", 0), ("compile", 32)])
def test_prefill_and_mixed_steps_match_cpu(elementwise, mixed):
    """Steps with prompt tokens, as CUDA graphs (mixed > 0; 32: the longest prompt's prefill stays
    eager) or eagerly, with either choice of row ops: prompts join running decodes one step apart
    (mixed prefill + decode steps), then decode graphs; greedy tokens and log-probs equal the CPU's."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    want = make_llm("tiny:qwen3").generate(PROMPTS, params, use_tqdm=False)
    gpu = make_llm("tiny:qwen3", device="cuda", dtype="float32", enforce_eager=False, elementwise=elementwise,
                   mixed_graph_tokens=mixed)
    seqs = {}
    for i, p in enumerate(PROMPTS):
        gpu.add_request(p, params, f"r{i}")
        seqs[i] = gpu.seqs[f"r{i}"]
        gpu.step()
    while not gpu.is_finished():
        gpu.step()
    assert gpu.stats.max_batch_size > 1
    assert [seqs[i].output_token_ids for i in range(len(PROMPTS))] == [o["token_ids"] for o in want]
    for i, o in enumerate(want):
        torch.testing.assert_close(torch.tensor(seqs[i].logprobs), torch.tensor(o["logprobs"]), atol=2e-3, rtol=0)
    mixed_graphs = gpu.runner.mixed
    assert (mixed_graphs is not None and mixed_graphs.replays >= len(PROMPTS) - 1) == (mixed > 0)


@pytest.mark.parametrize("steps", [1, 6])
def test_cuda_graph_multi_step_matches_cpu(steps):
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (24, 3, 40, 9)]
    cpu = [o["token_ids"] for o in make_llm("tiny:qwen3").generate(PROMPTS, params, use_tqdm=False)]
    gpu = make_llm("tiny:qwen3", device="cuda", dtype="float32", enforce_eager=False, decode_steps=steps)
    got = [o["token_ids"] for o in gpu.generate(PROMPTS, params, use_tqdm=False)]
    assert got == cpu


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("prologue", ["none", "norm", "norm_residual", "silu_mul"])
def test_small_gemv_matches_reference(dtype, tol, m, prologue):
    import torch.nn.functional as F

    from omni_ray.ar.kernels.triton_gemv import gemv
    from omni_ray.ar.layers.ops import add_rms_norm, rms_norm, silu_and_mul
    torch.manual_seed(0)
    n, k = 1000, 1040                                   # not multiples of the tiles
    x = torch.randn(m, 2 * k if prologue == "silu_mul" else k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=dtype)
    nw = torch.rand(k, device="cuda", dtype=dtype) + 0.5
    r = torch.randn(m, k, device="cuda", dtype=dtype)
    if prologue == "none":
        got, want = gemv(x, w, b), F.linear(x, w, b)
    elif prologue == "norm":
        got, want = gemv(x, w, prologue="norm", norm_w=nw, eps=1e-6), F.linear(rms_norm(x, nw, 1e-6), w)
    elif prologue == "norm_residual":
        got, res = gemv(x, w, prologue="norm", residual=r, norm_w=nw, eps=1e-6)
        h, want_res = add_rms_norm(x, r, nw, 1e-6)
        want = F.linear(h, w)
        assert torch.equal(res, want_res)
    else:
        got, want = gemv(x, w, prologue="silu_mul"), F.linear(silu_and_mul(x), w)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("config", [None, {"BLOCK_N": 1, "BLOCK_K": 256, "num_warps": 2},
                                    {"BLOCK_N": 8, "BLOCK_K": 2048, "num_warps": 8}])
def test_small_gemv_tiles_and_pdl_agree(config):
    """Any tile configuration, with and without programmatic dependent launch, inside a CUDA graph
    (where PDL overlaps consecutive kernels): the same result as one plain launch."""
    from omni_ray.ar.kernels.triton_gemv import gemv
    torch.manual_seed(0)
    x = torch.randn(1, 3072, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16) / 50 for _ in range(4)]
    want = x[:, :1024].clone()
    for w in ws:                        # a chain: each GEMV reads the previous one's output
        want = torch.cat([want, want, want], 1) if want.shape[1] == 1024 else want
        want = gemv(want, w, config=config, pdl=False)
    g = torch.cuda.CUDAGraph()
    y0 = x[:, :1024].clone()
    gemv(torch.cat([y0] * 3, 1), ws[0], config=config, pdl=True)        # compile outside the graph
    with torch.cuda.graph(g):
        y = y0
        for w in ws:
            y = gemv(torch.cat([y, y, y], 1), w, config=config, pdl=True)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want)


def _ids(llm, prompts, params):
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_async_decode_on_cuda_graphs_equals_single_runs(dtype, resumes):
    """``async_decode`` with decode CUDA graphs: 44 sequences (a padded graph batch) whose lengths
    end inside 4-step runs and cross blocks; runs queued one ahead give the same tokens as the engine
    without overlap, in the same dtype, and every block comes back."""
    prompts = [f"{p} ({i})" for i in range(11) for p in PROMPTS]
    params = [SamplingParams(temperature=0, max_tokens=9 + 7 * (i % 9), ignore_eos=True) for i in range(len(prompts))]
    kw = dict(device="cuda", dtype=dtype, enforce_eager=False, decode_steps=4)
    want = _ids(make_llm("tiny:qwen3", async_decode=False, **kw), prompts, params)
    overlap = make_llm("tiny:qwen3", async_decode=True, **kw)
    assert _ids(overlap, prompts, params) == want
    assert resumes["resumed"] >= 5
    assert overlap.block_manager.num_free_blocks == overlap.block_manager.num_blocks


def test_async_decode_on_cuda_with_stops_and_joins_equals_cpu(resumes):
    """float32 on CUDA graphs against the CPU engine: a stop token ends a sequence inside a run
    while the next run is queued, and requests join one per step while runs are in flight."""
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    cpu = make_llm("tiny:qwen3")
    ref = _ids(cpu, PROMPTS[:1], free)[0]
    stop = ref[9]                                    # the first prompt's 10th token
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop])
    want = _ids(cpu, PROMPTS, params)
    gpu = make_llm("tiny:qwen3", device="cuda", dtype="float32", enforce_eager=False, decode_steps=4, async_decode=True)
    seqs = [gpu.add_request(p, params, f"r{i}") for i, p in enumerate(PROMPTS[:2])]
    for _ in range(8):
        gpu.step()
        if gpu._inflight is not None:                # a run in flight when the others come
            break
    assert gpu._inflight is not None
    for i, p in enumerate(PROMPTS[2:], start=2):
        seqs.append(gpu.add_request(p, params, f"r{i}"))
        gpu.step()
    while not gpu.is_finished():
        gpu.step()
    assert [s.output_token_ids for s in seqs] == want
    assert len(want[0]) == ref.index(stop) + 1 < 30 and resumes["resumed"] > 0
    assert gpu.block_manager.num_free_blocks == gpu.block_manager.num_blocks


@pytest.mark.parametrize("async_decode", [False, True])
def test_sampled_multi_step_on_cuda_graphs_equals_single_steps(async_decode):
    """Seeded sampling between graph replays (CUDA generators, top-p / top-k / min-p, log-probs):
    4-step runs, queued one ahead or not, give the tokens and log-probabilities of single steps."""
    from tests.ar.test_engine import SAMPLED
    kw = dict(device="cuda", dtype="float32", enforce_eager=False)
    want = make_llm("tiny:qwen3", decode_steps=1, async_decode=False, **kw).generate(PROMPTS, SAMPLED, use_tqdm=False)
    llm = make_llm("tiny:qwen3", decode_steps=4, async_decode=async_decode, **kw)
    got = llm.generate(PROMPTS, SAMPLED, use_tqdm=False)
    assert [(o["token_ids"], o["finish_reason"]) for o in got] == [(o["token_ids"], o["finish_reason"]) for o in want]
    for g, w in zip(got, want):
        if "logprobs" in w:
            torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-4, rtol=0)
    assert llm.stats.forwards > llm.stats.steps
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
