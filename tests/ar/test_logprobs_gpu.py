"""CUDA: top logprobs of CUDA-graph decode runs (multi-step, queued one ahead) and prompt logprobs of
steps that would otherwise replay mixed-step graphs equal the eager engine's."""

import pytest
import torch

from omni_ray.ar import SamplingParams
from tests.ar.conftest import PROMPTS, make_llm

pytestmark = pytest.mark.gpu

PARAMS = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=5),
          SamplingParams(temperature=0.9, top_p=0.9, seed=4, max_tokens=17, ignore_eos=True, logprobs=20),
          SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),                    # asks nothing
          SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=0, prompt_logprobs=3)]


def _same(got: list[dict], want: list[dict], atol: float) -> None:
    """Equal tokens, log-probabilities within ``atol``, alternatives in the same rank order."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"] and set(g) == set(w)
        if "logprobs" in w:
            torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=atol, rtol=0)
        for gt, wt in zip(g.get("top_logprobs", []), w.get("top_logprobs", [])):
            assert list(gt) == list(wt)
            torch.testing.assert_close(torch.tensor(list(gt.values())), torch.tensor(list(wt.values())),
                                       atol=atol, rtol=0)
        for gp, wp in zip(g.get("prompt_logprobs", [])[1:], w.get("prompt_logprobs", [])[1:]):
            assert list(gp) == list(wp)
            torch.testing.assert_close(torch.tensor(list(gp.values())), torch.tensor(list(wp.values())),
                                       atol=atol, rtol=0)


@pytest.mark.parametrize("async_decode", [False, True])
def test_cuda_graph_decode_top_logprobs_equal_eager(async_decode):
    kw = dict(device="cuda", dtype="float32")
    eager = make_llm("tiny:qwen3", enforce_eager=True, decode_steps=1, **kw).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = make_llm("tiny:qwen3", enforce_eager=False, decode_steps=4, async_decode=async_decode, **kw)
    got = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    _same(got, eager, 1e-4)
    assert llm.stats.forwards > llm.stats.steps                    # multi-step graph runs happened
    # the CPU engine's chosen-token log-probabilities (seeded sampling draws per device: greedy rows only)
    rows = [0, 2, 3]
    cpu = make_llm("tiny:qwen3").generate([PROMPTS[i] for i in rows], [PARAMS[i] for i in rows], use_tqdm=False)
    for i, c in zip(rows, cpu):
        assert got[i]["token_ids"] == c["token_ids"]
        if "logprobs" in c:
            torch.testing.assert_close(torch.tensor(got[i]["logprobs"]), torch.tensor(c["logprobs"]), atol=2e-3,
                                       rtol=0)


def test_prompt_logprobs_on_cuda_equal_cpu():
    """Steps with prompt_logprobs rows leave the mixed-step graphs for the eager path (every row's logits)."""
    params = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=2)
    cpu = make_llm("tiny:qwen3").generate(PROMPTS, params, use_tqdm=False)
    gpu = make_llm("tiny:qwen3", device="cuda", dtype="float32", enforce_eager=False, mixed_graph_tokens=2048)
    got = gpu.generate(PROMPTS, params, use_tqdm=False)
    for g, c in zip(got, cpu):
        assert g["finish_reason"] == "length" and g["token_ids"] == []
        chosen = lambda o: [next(iter(e.values())) for e in o["prompt_logprobs"][1:]]  # noqa: E731
        torch.testing.assert_close(torch.tensor(chosen(g)), torch.tensor(chosen(c)), atol=2e-3, rtol=0)
