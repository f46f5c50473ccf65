"""Tensor-parallel AR engine on CPU (gloo, 2 ranks as Ray actors): TP=2 against TP=1, per-rank
checkpoint reads, and a worker killed mid-generation."""

from __future__ import annotations

import asyncio

import pytest
import ray

from omni_ray.ar import LLM, AsyncLLM, SamplingParams
from omni_ray.config import AREngineConfig
from omni_ray.errors import EngineError
from tests.ar.tensor_parallel.conftest import kill_worker_mid_decode

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

PROMPTS = [
    "The old lighthouse stood at the edge of the harbour",
    "Hello! How can I help you today?",
    "A",
    "Write a short poem about a red fox running through fresh snow under a full moon, then describe the",
]
KW = dict(enforce_eager=True, device="cpu", kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=256,
          max_num_batched_tokens=24)     # small budget: chunked prefills mixed with decodes


def greedy(n=12):
    return SamplingParams(temperature=0.0, max_tokens=n, logprobs=0, ignore_eos=True)


# tiny:qwen3-wide: 8 heads / 4 KV heads -> 4 + 2 per rank; tiny:qwen2: 4 heads / 1 KV head -> replicated
@pytest.mark.parametrize("model,kv_per_rank", [("tiny:qwen3-wide", 2), ("tiny:qwen2", 1)])
def test_tp2_equals_tp1(ray_local, model, kv_per_rank):
    fast = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)      # multi-step decode path
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=8) for i in range(len(PROMPTS))]
    ref = LLM(model, **KW)
    want = ref.generate(PROMPTS, greedy(), use_tqdm=False)
    want_fast = ref.generate(PROMPTS, fast, use_tqdm=False)
    want_seeded = ref.generate(PROMPTS, seeded, use_tqdm=False)
    want_hidden = ref.encode(PROMPTS[:2])
    streamed = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, return_hidden_states=True)
    want_rows = ref.generate(PROMPTS[:2], streamed, use_tqdm=False)
    llm = LLM(model, tensor_parallel_size=2, **KW)
    try:
        got = llm.generate(PROMPTS, greedy(), use_tqdm=False)
        for w, g in zip(want, got):
            assert g["token_ids"] == w["token_ids"]
            assert max(abs(a - b) for a, b in zip(w["logprobs"], g["logprobs"])) < 1e-4
        assert [o["token_ids"] for o in llm.generate(PROMPTS, fast, use_tqdm=False)] == \
            [o["token_ids"] for o in want_fast]
        forwards, steps = llm.stats.forwards, llm.stats.steps
        assert [o["token_ids"] for o in llm.generate(PROMPTS, seeded, use_tqdm=False)] == \
            [o["token_ids"] for o in want_seeded]                              # rank 0 samples, broadcasts
        assert llm.stats.forwards - forwards > llm.stats.steps - steps         # in multi-step runs
        for w, g in zip(want_hidden, llm.encode(PROMPTS[:2])):          # every prompt row, all features
            assert g.shape == w.shape and (g - w).abs().max() < 1e-4
        for w, g in zip(want_rows, llm.generate(PROMPTS[:2], streamed, use_tqdm=False)):   # rank 0's decode rows
            assert g["hidden_states"].shape == w["hidden_states"].shape
            assert (g["hidden_states"] - w["hidden_states"]).abs().max() < 1e-4
        assert llm.stats.steps > 0 and llm.engine_stats()["num_free_blocks"] == 128
        info = llm.runner.rank_info()
        assert [i["rank"] for i in info] == [0, 1]
        assert all(i["kv_heads"] == kv_per_rank and i["num_blocks"] == 128 for i in info)
    finally:
        llm.shutdown()


def test_each_rank_reads_only_its_slices(ray_local):
    llm = LLM("tiny:qwen2", tensor_parallel_size=2, **KW)     # q split, the single KV head replicated
    try:
        stats = llm.runner.load_stats()
        param_bytes = llm.runner.group.call_all("param_bytes")
    finally:
        llm.shutdown()
    full = stats[0].checkpoint_bytes
    a = llm.arch
    hd = a.head_dim
    for rank, st in enumerate(stats):
        assert st.bytes_read == param_bytes[rank]           # exactly its own parameters' bytes
        assert st.bytes_read < 0.53 * full                   # about half (norms + the KV head are whole)
        for layer in range(a.num_layers):
            pre = f"model.layers.{layer}."
            assert st.reads[pre + "self_attn.q_proj.weight"] == [(a.num_heads // 2 * hd, a.hidden_size)]
            assert st.reads[pre + "self_attn.k_proj.weight"] == [(hd, a.hidden_size)]   # replicated head
            assert st.reads[pre + "self_attn.o_proj.weight"] == [(a.hidden_size, a.num_heads // 2 * hd)]
            assert st.reads[pre + "mlp.down_proj.weight"] == [(a.hidden_size, a.intermediate_size // 2)]
        assert st.reads["lm_head.weight"] == [(a.vocab_size // 2, a.hidden_size)]
    assert stats[0].bytes_read + stats[1].bytes_read > full  # replicated pieces counted on both


def test_killed_worker_fails_requests_offline(ray_local):
    llm = LLM("tiny:qwen3", tensor_parallel_size=2, **KW)
    try:
        assert kill_worker_mid_decode(llm, PROMPTS[:2], 200, "tensor-parallel group: worker rank 1 of 2 is gone") < 30
        with pytest.raises(EngineError, match="rank 1"):
            llm.check_health()
    finally:
        llm.shutdown()
    again = LLM("tiny:qwen3", tensor_parallel_size=2, **KW)     # a fresh group in the same process
    try:
        assert len(again.generate(["A"], greedy(4), use_tqdm=False)[0]["token_ids"]) == 4
    finally:
        again.shutdown()


def test_killed_worker_fails_async_requests_and_reports_unhealthy(ray_local):
    cfg = AREngineConfig.from_kwargs("tiny:qwen3", tensor_parallel_size=2, **KW)

    async def main():
        engine = AsyncLLM(cfg)
        params = SamplingParams(temperature=0.0, max_tokens=220, ignore_eos=True)
        first = asyncio.Event()

        async def consume(rid: str, prompt: str):
            async for _ in engine.generate(prompt, params, rid):
                first.set()

        tasks = [asyncio.create_task(consume(f"a{i}", p)) for i, p in enumerate(PROMPTS[:2])]
        await asyncio.wait_for(first.wait(), 60)
        engine.check_health()
        ray.kill(engine.engine.runner.group.actors[0], no_restart=True)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        assert all(isinstance(r, EngineError) and "rank 1" in r.message for r in results), results
        with pytest.raises(EngineError, match="rank 1"):
            engine.check_health()
        with pytest.raises(EngineError):                           # new requests fail at once
            async for _ in engine.generate("Hello", params, "late"):
                pass
        await engine.shutdown()

    asyncio.run(main())
