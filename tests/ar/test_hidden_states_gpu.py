"""``return_hidden_states`` on CUDA: the rows of the decode CUDA graphs (their hidden-state output buffer,
multi-step runs, runs queued ahead of the one in flight, on-device sampling), of the mixed-step graphs
(prompts joining running decodes) and of eager steps, equal ``encode(prompt + reply[:-1])`` on the same
GPU; requests without the flag beside them keep their tokens."""

import pytest
import torch

from omni_ray.ar import SamplingParams
from tests.ar.conftest import PROMPTS, make_llm

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
@pytest.mark.parametrize("async_decode", [False, True])
def test_graph_rows_equal_encode(dtype, tol, async_decode, resumes):
    gpu = make_llm("tiny:qwen3", device="cuda", dtype=dtype, enforce_eager=False, decode_steps=4,
                   async_decode=async_decode, mixed_graph_tokens=2048)
    assert gpu.runner.graphs and gpu.runner.mixed is not None
    asked = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, return_hidden_states=True),
             SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
             SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=33, ignore_eos=True,
                            return_hidden_states=True),                   # sampled on the device between forwards
             SamplingParams(temperature=0, max_tokens=29, ignore_eos=True, return_hidden_states=True)]
    seqs = []
    for i, (p, sp) in enumerate(zip(PROMPTS, asked)):     # each joins the running decodes: mixed-step graphs
        seqs.append(gpu.add_request(p, sp, f"r{i}"))
        gpu.step()
    while not gpu.is_finished():
        gpu.step()
    assert gpu.runner.mixed.replays >= len(PROMPTS) - 1 and gpu.stats.forwards > gpu.stats.steps
    assert (resumes["resumed"] > 0) == async_decode
    if dtype == "float32":                                # the request beside them: the tokens it gets alone
        alone = make_llm("tiny:qwen3", device="cuda", dtype=dtype, enforce_eager=False)
        assert seqs[1].output_token_ids == alone.generate([PROMPTS[1]], asked[1], use_tqdm=False)[0]["token_ids"]
    for p, s in zip(PROMPTS, seqs):
        if not s.params.return_hidden_states:
            assert not s.hidden_rows and s.num_hidden_rows == 0
            continue
        got = torch.cat(s.hidden_rows)
        want = gpu.encode([gpu.tokenize(p) + s.output_token_ids[:-1]])[0]
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
