"""Top-k and prompt log-probabilities equal transformers' log_softmax of the same model's logits
(fp32 tiny checkpoint, CPU): sampled and greedy rows, multi-step decode runs, chunked prefill,
repeated (prefix-cached) prompts, max_tokens=0, and rows that ask nothing beside rows that do."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from omni_ray.ar import SamplingParams
from omni_ray.errors import InvalidRequestError
from omni_ray.testing import resolve_model
from tests.ar.conftest import PROMPTS, make_llm

K = 5
LONG = " ".join(PROMPTS) + " and then the fox came back to the lighthouse"


@pytest.fixture(scope="module")
def hf():
    return AutoModelForCausalLM.from_pretrained(resolve_model("tiny:qwen3"), dtype=torch.float32).eval()


def ref_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row p is log P(next token | ids[:p + 1]) under transformers."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_top(ref_row: torch.Tensor, got: dict[int, float], k: int) -> None:
    want_lp, want_ids = ref_row.topk(k)
    assert list(got) == want_ids.tolist()                       # ids, in rank order
    torch.testing.assert_close(torch.tensor(list(got.values())), want_lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=K),
    SamplingParams(temperature=1.0, seed=3, max_tokens=9, ignore_eos=True, logprobs=K),   # chosen != top-1
], ids=["greedy", "sampled"])
def test_top_logprobs_equal_transformers(qwen3, hf, params):
    steps, forwards = qwen3.stats.steps, qwen3.stats.forwards
    outs = qwen3.generate(PROMPTS, params, use_tqdm=False)
    assert qwen3.stats.forwards - forwards > qwen3.stats.steps - steps     # multi-step decode runs ([steps, n, 1+K])
    for prompt, out in zip(PROMPTS, outs):
        p_ids = qwen3.tokenizer.encode(prompt)
        ref = ref_logprobs(hf, p_ids + out["token_ids"])
        assert len(out["logprobs"]) == len(out["top_logprobs"]) == len(out["token_ids"]) == 9
        for j, tok in enumerate(out["token_ids"]):
            row = ref[len(p_ids) + j - 1]
            assert out["logprobs"][j] == pytest.approx(row[tok].item(), abs=1e-4)
            check_top(row, out["top_logprobs"][j], K)


def test_rows_without_logprobs_are_unchanged_beside_rows_with_them(qwen3):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = qwen3.generate(PROMPTS[:2], plain, use_tqdm=False)
    mixed = qwen3.generate(PROMPTS[:2] * 2, [plain, plain, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                          logprobs=20, prompt_logprobs=2)] * 1
                           + [plain], use_tqdm=False)
    assert [o["token_ids"] for o in mixed[:2]] == [o["token_ids"] for o in alone]
    assert all("logprobs" not in o and "prompt_logprobs" not in o for o in mixed[:2] + mixed[3:])
    assert mixed[2]["token_ids"] == alone[0]["token_ids"] and len(mixed[2]["top_logprobs"][0]) == 20


def check_prompt_logprobs(hf, ids: list[int], got: list, k: int) -> None:
    ref = ref_logprobs(hf, ids)
    assert got[0] is None and len(got) == len(ids)
    for p in range(1, len(ids)):
        entry = got[p]
        assert next(iter(entry)) == ids[p]                     # the prompt token first, then the top k
        assert entry[ids[p]] == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-4)
        assert len(entry) in (k, k + 1) or (k == 0 and len(entry) == 1)
        check_top(ref[p - 1], dict(sorted(entry.items(), key=lambda x: -x[1])[:k]), k)


@pytest.mark.parametrize("chunk", [None, 16], ids=["one-prefill", "chunked-prefill"])
def test_prompt_logprobs_equal_a_full_transformers_forward(hf, chunk):
    kw = {} if chunk is None else {"max_num_batched_tokens": chunk, "max_num_seqs": 4}
    llm = make_llm("tiny:qwen3", **kw)
    ids = llm.tokenizer.encode(LONG)
    assert chunk is None or len(ids) > 3 * chunk
    out = llm.generate([LONG], SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=3), use_tqdm=False)[0]
    assert out["token_ids"] == [] and out["finish_reason"] == "length" and out["text"] == ""
    check_prompt_logprobs(hf, ids, out["prompt_logprobs"], 3)
    # with a generated token too, after the prompt's blocks went into the prefix cache
    plain = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([ids], plain, use_tqdm=False)
    hits = llm.block_manager.prefix_hits
    llm.generate([ids], plain, use_tqdm=False)
    assert llm.block_manager.prefix_hits > hits                 # the cache holds the prompt ...
    hits = llm.block_manager.prefix_hits
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, logprobs=1),
                       use_tqdm=False)[0]
    assert llm.block_manager.prefix_hits == hits                # ... which a prompt_logprobs request computes anew
    check_prompt_logprobs(hf, ids, out["prompt_logprobs"], 1)
    check_top(ref_logprobs(hf, ids)[-1], out["top_logprobs"][0], 1)


def test_prompt_of_a_full_context_with_max_tokens_0(hf):
    llm = make_llm("tiny:qwen3", max_model_len=32)
    ids = (llm.tokenizer.encode(LONG) * 2)[:32]
    out = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    assert out["token_ids"] == [] and len(out["prompt_logprobs"]) == 32
    check_prompt_logprobs(hf, ids, out["prompt_logprobs"], 0)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprob_bounds(field):
    SamplingParams(**{field: 20})
    for bad in (21, -1, True, 1.5):
        with pytest.raises(InvalidRequestError, match=f"{field} must be an integer in \\[0, 20\\]") as e:
            SamplingParams(**{field: bad})
        assert e.value.param == field
