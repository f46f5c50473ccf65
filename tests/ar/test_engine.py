"""Engine behaviour: prefix caching, preemption, chunked prefill, mixed batches, stops, seeds, abort."""

import pytest
import torch

from omni_ray.ar import EncodeParams, SamplingParams
from omni_ray.errors import InvalidRequestError
from tests.ar.conftest import PROMPTS, make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SHARED = ("Scientists study the stars to learn how galaxies form and how the universe has changed "
          "over billions of years. ")
PREFIXED = [SHARED + s for s in ("Red", "A cup of tea", "The train left the station", "Bees carry pollen")]


def reference(prompts, **kw):
    llm = make_llm(enable_prefix_caching=False, **kw)
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_prefix_caching_same_output_and_hits():
    want = reference(PREFIXED)
    llm = make_llm(enable_prefix_caching=True)
    first = [o["token_ids"] for o in llm.generate(PREFIXED[:1], GREEDY, use_tqdm=False)]
    rest = [o["token_ids"] for o in llm.generate(PREFIXED[1:], GREEDY, use_tqdm=False)]
    assert first + rest == want
    stats = llm.engine_stats()
    shared_blocks = len(llm.tokenizer.encode(SHARED)) // 16
    assert shared_blocks >= 1
    assert stats["prefix_cache_hit_tokens"] >= 3 * shared_blocks * 16
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_preemption_under_tiny_kv_budget():
    want = reference(PROMPTS)
    llm = make_llm(num_kvcache_blocks=10, max_model_len=128, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = [o["token_ids"] for o in llm.generate(PROMPTS * 3, params, use_tqdm=False)]
    assert llm.scheduler.num_preemptions > 0
    assert got == want * 3
    assert llm.block_manager.num_free_blocks == 10


def test_chunked_prefill_same_output_and_decodes_keep_running():
    want = reference(PROMPTS)
    llm = make_llm(max_num_batched_tokens=8)
    got = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == want
    # a long prompt admitted while another sequence decodes: both progress in the same steps
    llm.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), "short")
    for _ in range(3):
        llm.step()
    long = llm.add_request(PROMPTS[3] * 3, GREEDY, "long")
    mixed = 0
    while not long.num_computed_tokens >= long.num_prompt_tokens:
        before = llm.seqs["short"].num_output_tokens if "short" in llm.seqs else None
        llm.step()
        if before is not None and "short" in llm.seqs and llm.seqs["short"].num_output_tokens > before:
            mixed += 1
    assert mixed >= 2   # the decode kept producing tokens while the long prompt was prefilled in chunks
    while not llm.is_finished():
        llm.step()


def test_mixed_hidden_state_and_generation_batch():
    llm = make_llm()
    want = reference(PROMPTS)
    alone = llm.encode(PROMPTS[:2])
    seqs = [llm.add_request(p, GREEDY) for p in PROMPTS]
    enc = [llm.add_request(p, EncodeParams()) for p in PROMPTS[:2]]
    while not llm.is_finished():
        llm.step()
    assert [s.output_token_ids for s in seqs] == want
    for e, a in zip(enc, alone):
        torch.testing.assert_close(torch.cat(e.hidden_chunks), a)
    assert llm.stats.batch_size_hist.get(6)   # one step ran all four generations and both encodes


def test_stop_strings_and_stop_tokens(qwen3):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = qwen3.generate([PROMPTS[1]], params, use_tqdm=False)[0]
    text = base["text"]
    cut = text[5:9]
    assert cut
    out = qwen3.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[cut]),
                         use_tqdm=False)[0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[: text.find(cut)]
    tok = base["token_ids"][3]
    out = qwen3.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tok]),
                         use_tqdm=False)[0]
    assert out["token_ids"][-1] == tok and len(out["token_ids"]) == base["token_ids"].index(tok) + 1


def test_seeds_reproducible_alone_and_in_batch(qwen3):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True, seed=1234)
    alone = qwen3.generate([PROMPTS[0]], p, use_tqdm=False)[0]["token_ids"]
    other = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = qwen3.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], [other, p, other], use_tqdm=False)
    assert batch[1]["token_ids"] == alone
    different = qwen3.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=99),
                               use_tqdm=False)[0]["token_ids"]
    assert different != alone


def test_abort_returns_every_block(qwen3):
    total = qwen3.block_manager.num_blocks
    for i, prompt in enumerate(PROMPTS):
        qwen3.add_request(prompt * 4, SamplingParams(max_tokens=100, ignore_eos=True), f"a{i}")
    for _ in range(3):
        qwen3.step()
    assert qwen3.block_manager.num_free_blocks < total
    for i in range(len(PROMPTS)):
        assert qwen3.abort(f"a{i}")
    assert qwen3.is_finished()
    assert qwen3.block_manager.num_free_blocks == total
    assert all(b.ref_count == 0 for b in qwen3.block_manager.blocks)


@pytest.mark.parametrize("prompt,params,param", [
    ("", SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([1, 2, 10 ** 6], SamplingParams(), "prompt"),
    ("x " * 600, SamplingParams(), "prompt"),
    ("hi", SamplingParams(max_tokens=600), "max_tokens"),
])
def test_bad_requests_raise_and_do_not_disturb(qwen3, prompt, params, param):
    good = qwen3.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    with pytest.raises(InvalidRequestError) as err:
        qwen3.add_request(prompt, params)
    assert err.value.param == param and err.value.http_status == 400
    while not qwen3.is_finished():
        qwen3.step()
    assert good.num_output_tokens == 4


@pytest.mark.parametrize("kw", [dict(max_tokens=-1), dict(logprobs=21), dict(temperature=-1), dict(top_p=0),
                                dict(top_p=1.5),
                                dict(top_k=-5), dict(min_p=2.0), dict(seed=-1)])
def test_bad_sampling_values(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kw)


def test_multi_step_decode_equals_single_steps():
    """decode_steps=k runs k greedy steps per schedule on the device: tokens, stops, lengths and the
    blocks freed must be what single steps give, across block boundaries (block_size 16)."""
    def run(k):
        llm = make_llm(decode_steps=k)
        outs = llm.generate(PROMPTS,
                            [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (37, 5, 1, 50)],
                            use_tqdm=False)
        stop = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                         stop_token_ids=[outs[0]["token_ids"][0]]), use_tqdm=False)
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        return [(o["token_ids"], o["finish_reason"]) for o in outs + stop], llm.stats
    want, single = run(1)
    for k in (3, 8):
        got, stats = run(k)
        assert got == want
        assert stats.steps < single.steps                      # fewer host steps for the same tokens
    assert [len(t) for t, _ in want[:4]] == [37, 5, 1, 50]


def test_encode_of_a_prompt_longer_than_a_block():
    """An encode request whose prompt fills KV blocks: its full blocks go to the prefix cache before
    the request finishes (regression: they were registered after being freed); a repeated encode
    still returns every position (it does not take prefix hits), and generation can reuse them."""
    llm = make_llm()
    long_prompt = PROMPTS[3] * 3                              # several 16-token blocks
    first = llm.encode(long_prompt)[0]
    again = llm.encode(long_prompt)[0]
    assert first.shape[0] == len(llm.tokenize(long_prompt))
    torch.testing.assert_close(first, again)
    llm.generate([long_prompt], GREEDY, use_tqdm=False)
    assert llm.block_manager.prefix_hits > 0                  # the encode's blocks served the generation
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_warmup_leaves_a_clean_engine():
    """warmup() runs throw-away requests through every path, then resets: same outputs after it,
    every block free, no prefix-cache entries or counters left from the warm-up."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o["token_ids"] for o in make_llm().generate(PROMPTS, params, use_tqdm=False)]
    llm = make_llm()
    llm.warmup()
    assert llm.is_finished() and not llm.seqs
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert llm.stats.steps == 0 and llm.block_manager.prefix_queries == 0
    assert [o["token_ids"] for o in llm.generate(PROMPTS, params, use_tqdm=False)] == want


def test_mixed_step_packing_equals_the_eager_inputs():
    """MixedStepGraphs.fill packs a step (decodes, a whole prompt, a prompt chunk that does not
    sample yet) into the graphs' int32 buffer: the same tokens, positions, slots, cu_seqlens,
    context lengths and block tables as the eager step's inputs, padding aimed at the scratch
    slot, and the last row of each sequence that samples."""
    from omni_ray.ar.worker.mixed_graphs import MixedStepGraphs, bucket_sizes
    assert bucket_sizes(100) == [16, 32, 64, 100] and bucket_sizes(0) == []
    llm = make_llm(max_num_batched_tokens=40)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:2]):
        llm.add_request(p, params, f"d{i}")
    llm.step()
    llm.add_request("The fox and the lighthouse keeper", params, "whole")
    llm.add_request(PROMPTS[3] * 3, params, "chunked")               # longer than what is left of the budget
    batch = llm.scheduler.schedule()
    assert batch.num_decodes == 2 and len(batch.seqs) == 4
    chunked = batch.seqs[3]
    assert chunked.num_computed_tokens + batch.num_new[3] < len(chunked)
    ids, pos, meta, cu = llm.runner.prepare(batch)
    g = MixedStepGraphs(llm.runner, 64)
    t, sampled = g.fill(batch)
    n, m, h, T = len(ids), len(batch.seqs), g.h, g.T
    assert t == next(b for b in g.sizes if b >= n) and sampled == [0, 1, 2]
    assert h[:n].tolist() == ids.tolist() and h[T:T + n].tolist() == pos.tolist()
    assert h[2 * T:2 * T + n].tolist() == meta.slot_mapping.tolist()
    assert (h[2 * T + n:2 * T + t] == llm.runner.scratch_slot).all() and (h[n:t] == 0).all()
    assert h[g.o_cu:g.o_cu + m + 1].tolist() == cu.tolist() and (h[g.o_cu + m + 1:g.o_cu + g.s + 1] == n).all()
    assert h[g.o_ctx:g.o_ctx + m].tolist() == meta.context_lens.tolist()
    table = h[g.o_bt:g.o_bt + g.s * g.w].reshape(g.s, g.w)
    for j, seq in enumerate(batch.seqs):
        assert table[j, :len(seq.block_table)].tolist() == seq.block_table
    assert h[g.o_rows:g.o_rows + 3].tolist() == [cu[1] - 1, cu[2] - 1, cu[3] - 1]
    assert all(x % 16 == 0 for x in (g.o_cu, g.o_ctx, g.o_rows, g.o_bt, g.o_qb, T))
    # the prefill kernel's flat grid: each sequence's blocks of M query rows, in order, then idle
    want = [(j << 16) | b for j, k in enumerate(batch.num_new) for b in range(-(-k // g.m))]
    assert h[g.o_qb:g.o_qb + len(want)].tolist() == want and (h[g.o_qb + len(want):] == -1).all()
    assert g.nqb >= -(-g.t_max // g.m) + g.s and len(h) == g.o_qb + g.nqb


SAMPLED = [SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=37),
           SamplingParams(temperature=1.0, top_k=20, seed=2, max_tokens=23, logprobs=0),
           SamplingParams(temperature=0, max_tokens=30, logprobs=0, ignore_eos=True),
           SamplingParams(temperature=0.7, min_p=0.05, seed=3, max_tokens=45, ignore_eos=True)]


@pytest.mark.parametrize("async_decode", [False, True])
def test_sampled_multi_step_decode_equals_single_steps(async_decode):
    """Seeded sampled requests (temperature with top-p, top-k, min-p) beside a greedy one, two with
    log-probabilities, run 4 steps per schedule with the sampling on the device between the
    forwards (and, with async_decode, the next run queued before this one is read): each seeded
    request draws once per step from its own generator, so the tokens, finish reasons and
    log-probabilities are those of single steps, in fewer host steps."""
    def run(k, overlap):
        llm = make_llm(decode_steps=k, async_decode=overlap)
        outs = llm.generate(PROMPTS, SAMPLED, use_tqdm=False)
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        return outs, llm.stats
    want, single = run(1, False)
    got, stats = run(4, async_decode)
    assert [(o["token_ids"], o["finish_reason"]) for o in got] == [(o["token_ids"], o["finish_reason"]) for o in want]
    for g, w in zip(got, want):
        if "logprobs" in w:
            assert len(g["logprobs"]) == len(w["logprobs"]) == len(w["token_ids"])
            torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-5, rtol=0)
    assert len(set(map(tuple, (o["token_ids"] for o in want)))) == len(want)
    assert stats.forwards > stats.steps and stats.steps < single.steps
