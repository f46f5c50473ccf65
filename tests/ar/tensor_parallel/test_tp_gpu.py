"""Tensor parallel on 2 GPUs (NCCL, CUDA graphs captured on every rank): TP=2 against TP=1, and a
dead worker. Skipped without 2 CUDA devices.  python -m pytest tests/ar/tensor_parallel/test_tp_gpu.py"""

from __future__ import annotations

import pytest
import torch

from omni_ray.ar import LLM, SamplingParams
from tests.ar.tensor_parallel.conftest import kill_worker_mid_decode
from tests.ar.tensor_parallel.test_tp_engine import PROMPTS

pytestmark = [pytest.mark.gpu, pytest.mark.ray, pytest.mark.timeout(600),
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

# float32: TP's partial sums in another order must not flip greedy ties of a random tiny model
KW = dict(device="cuda", dtype="float32", kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=512,
          max_num_seqs=16, max_num_batched_tokens=64)


@pytest.mark.parametrize("model", ["tiny:qwen3-wide", "tiny:qwen2"])
@pytest.mark.parametrize("decode_steps", [1, 4])
def test_tp2_cuda_graphs_equal_tp1(ray_local, model, decode_steps):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    ref = LLM(model, decode_steps=decode_steps, **KW)
    want = ref.generate(PROMPTS, params, use_tqdm=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want_greedy = ref.generate(PROMPTS, greedy, use_tqdm=False)       # the in-graph argmax path
    del ref
    torch.cuda.empty_cache()
    llm = LLM(model, tensor_parallel_size=2, decode_steps=decode_steps, **KW)
    try:
        assert llm.runner.graphs, "no CUDA graphs captured on rank 0"
        assert all(i["graphs"] == sorted(llm.runner.graphs) for i in llm.runner.rank_info())
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        for w, g in zip(want, got):
            assert g["token_ids"] == w["token_ids"]
            assert max(abs(a - b) for a, b in zip(w["logprobs"], g["logprobs"])) < 1e-3
        got_greedy = llm.generate(PROMPTS, greedy, use_tqdm=False)
        assert [g["token_ids"] for g in got_greedy] == [w["token_ids"] for w in want_greedy]
    finally:
        llm.shutdown()


def test_tp2_cuda_killed_worker_fails_fast(ray_local):
    llm = LLM("tiny:qwen3", tensor_parallel_size=2, **KW)
    try:
        # the watchdog aborts NCCL; no collective timeout
        assert kill_worker_mid_decode(llm, PROMPTS[:2], 400, "rank 1 of 2 is gone") < 60
    finally:
        llm.shutdown()
    again = LLM("tiny:qwen3", tensor_parallel_size=2, **KW)
    try:
        assert len(again.generate(["A"], SamplingParams(max_tokens=4, ignore_eos=True),
                                  use_tqdm=False)[0]["token_ids"]) == 4
    finally:
        again.shutdown()
