"""``SamplingParams.return_hidden_states``: a generating request streams the final (normed) hidden state
of every position it feeds, the prompt's then one per generated token but the last. Whatever path
the steps take (single or multi-step decode, runs queued ahead, chunked prefill, batched with other
requests, the prefix cache, preemption, media prompts), the rows of a finished request equal
``encode(prompt + reply[:-1])``. The CUDA graphs' paths: test_hidden_states_gpu.py."""

import dataclasses

import numpy as np
import pytest
import torch

from omni_ray.ar import SamplingParams
from omni_ray.ar.engine.engine_core import CoreLoop
from omni_ray.errors import InvalidRequestError
from tests.ar.conftest import PROMPTS, make_llm


def params(n: int, hidden: bool = True) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, return_hidden_states=hidden)


def fed(llm, prompt, out) -> list[int]:
    """The prompt and the generated tokens the engine fed back (all but the last), as ``encode`` takes them."""
    return llm.tokenize(prompt) + out["token_ids"][:-1]


def assert_rows_equal_encode(llm, prompts, outs, ref=None):
    ref = ref or llm
    want = ref.encode([fed(ref, p, o) for p, o in zip(prompts, outs)])
    for o, w in zip(outs, want):
        got = o["hidden_states"]
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == w.shape
        torch.testing.assert_close(got, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(decode_steps=1), dict(decode_steps=4, async_decode=False),
                                dict(decode_steps=4, async_decode=True), dict(max_num_batched_tokens=8)],
                         ids=["single-step", "multi-step", "queued-ahead", "chunked-prefill"])
def test_rows_equal_encode_of_prompt_and_reply(kw, resumes):
    """Batched with requests of other lengths that did not ask (they get no rows)."""
    llm = make_llm(**kw)
    ps = [params(9), params(5, hidden=False), params(29), params(21)]
    outs = llm.generate(PROMPTS, ps, use_tqdm=False)
    assert "hidden_states" not in outs[1]
    asked = [0, 2, 3]
    assert_rows_equal_encode(llm, [PROMPTS[i] for i in asked], [outs[i] for i in asked])
    assert outs[1]["token_ids"] == make_llm().generate([PROMPTS[1]], params(5, False), use_tqdm=False)[0]["token_ids"]
    if kw.get("decode_steps", 4) > 1 and "max_num_batched_tokens" not in kw:
        assert llm.stats.forwards > llm.stats.steps                  # decode runs of several forwards
        assert (resumes["resumed"] > 0) == kw["async_decode"]      # runs queued on top of one in flight


def test_prefix_cache_hit_still_returns_every_prompt_row():
    llm = make_llm(enable_prefix_caching=True)
    prompt = PROMPTS[3] * 2                                        # several full blocks
    llm.generate([prompt], params(4, hidden=False), use_tqdm=False)
    hits = llm.block_manager.prefix_hits
    out = llm.generate([prompt], params(6), use_tqdm=False)[0]
    assert llm.block_manager.prefix_hits == hits                   # computed, not taken from the cache
    assert out["hidden_states"].shape[0] == len(llm.tokenize(prompt)) + 5
    assert_rows_equal_encode(llm, [prompt], [out])


def test_preempted_request_repeats_no_row():
    """Preemption recomputes a sequence from scratch; rows already produced are not produced again."""
    llm = make_llm(num_kvcache_blocks=10, max_model_len=128, enable_prefix_caching=False, decode_steps=1)
    outs = llm.generate(PROMPTS * 3, params(16), use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    assert_rows_equal_encode(llm, PROMPTS * 3, outs)


def test_streamed_outputs_carry_new_rows_only():
    """CoreLoop (what AsyncLLM's cores run): each output has the rows new since the previous one,
    prompt chunks included (their rows go out before the first token); concatenated, all of them."""
    llm = make_llm(max_num_batched_tokens=8)
    core = CoreLoop(llm)
    core.apply([("a", PROMPTS[0], params(6), False), ("b", PROMPTS[1], params(6, hidden=False), False)], [])
    outs = {"a": [], "b": []}
    while not llm.is_finished():
        for rid, o in core.step():
            outs[rid].append(o)
    a = outs["a"]
    n_prompt = len(llm.tokenize(PROMPTS[0]))
    assert a[0].token_ids == [] and 0 < a[0].hidden_states.shape[0] <= 8      # a prompt chunk's rows
    assert all(o.hidden_states is not None for o in a) and all(o.prompt_positions is None for o in a)
    assert all(o.hidden_states is None for o in outs["b"])
    rows = torch.from_numpy(np.concatenate([o.hidden_states for o in a]))
    tokens = [t for o in a for t in o.token_ids]
    assert rows.shape[0] == n_prompt + 5
    assert_rows_equal_encode(llm, [PROMPTS[0]], [{"hidden_states": rows, "token_ids": tokens}])


def test_media_prompt_rows_positions_and_rope_delta():
    """tiny:qwen2.5-omni's thinker with an image: the rows, and the prompt's M-RoPE positions and rope delta
    (what the talker's input needs) in the first output; a text request in the same batch gets None."""
    from tests.ar.test_mm_encoders import _image

    llm = make_llm("tiny:qwen2.5-omni", max_num_batched_tokens=40)
    msgs = [{"role": "user", "content": [{"type": "image", "image": _image(64, 90, 1)},
                                         {"type": "text", "text": "Describe it."}]}]
    mm = llm.render(msgs)
    outs = llm.generate([mm, PROMPTS[2]], [params(6), params(4)], use_tqdm=False)
    assert mm.rope_delta != 0
    torch.testing.assert_close(outs[0]["prompt_positions"], mm.positions)
    assert outs[0]["rope_delta"] == mm.rope_delta
    assert outs[1]["prompt_positions"] is None and outs[1]["rope_delta"] is None
    want = llm.encode([dataclasses.replace(mm, token_ids=mm.token_ids + outs[0]["token_ids"][:-1]),
                       llm.tokenize(PROMPTS[2]) + outs[1]["token_ids"][:-1]])
    for o, w in zip(outs, want):
        torch.testing.assert_close(o["hidden_states"], w, atol=1e-5, rtol=0)


def test_flag_is_checked():
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(return_hidden_states="yes")
    assert err.value.param == "return_hidden_states"
