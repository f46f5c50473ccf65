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
    cpu = make_llm("tiny:qwen3").generate(PROMPTS, PARAMS[:1] + PARAMS[2:], use_tqdm=False)   # seeded: per device
    _same([got[0]] + got[2:], cpu, 2e-3)
