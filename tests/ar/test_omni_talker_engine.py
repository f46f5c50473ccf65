"""The engine's embeddings-in path (``InputEmbeds``) that the talker runs on: vLLM-style ``prompt_embeds``
on a plain decoder, per-step rows streamed in while the request runs (it waits for them), bad input."""

import pytest
import torch

from omni_ray.ar import SamplingParams
from omni_ray.ar.input_embeds import InputEmbeds
from omni_ray.errors import InvalidRequestError
from tests.ar.conftest import make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_prompt_embeds_equal_token_prompt(qwen3):
    """A decoder fed its own token embeddings as ``prompt_embeds`` continues as from the token ids,
    also batched with a token prompt; step rows add to the fed tokens' embeddings."""
    ids = qwen3.tokenize("The old lighthouse stood at the edge of the harbour")
    table = qwen3.runner.model.embed_tokens.weight.detach()
    want = qwen3.generate([ids], GREEDY, use_tqdm=False)[0]["token_ids"]
    outs = qwen3.generate([{"prompt_embeds": table[ids]}, ids[:5]], GREEDY, use_tqdm=False)
    assert outs[0]["token_ids"] == want
    assert outs[1]["token_ids"] == qwen3.generate([ids[:5]], GREEDY, use_tqdm=False)[0]["token_ids"]
    zero = InputEmbeds(table[ids], steps=torch.zeros(3, table.shape[1]))      # adding zeros changes nothing
    assert qwen3.generate(zero, GREEDY, use_tqdm=False)[0]["token_ids"] == want
    pushed = InputEmbeds(table[ids], steps=5 * table[ids[:3]])                # ... other rows do
    assert qwen3.generate(pushed, GREEDY, use_tqdm=False)[0]["token_ids"] != want


def test_streamed_step_rows(qwen3):
    """A request whose step rows arrive while it runs waits for each (keeps its blocks, other requests go
    on), and ends with the tokens of the same rows given up front."""
    ids = qwen3.tokenize("Hello! How can I help you today?")
    table = qwen3.runner.model.embed_tokens.weight.detach()
    rows = 3 * table[[7, 8, 9, 10]]
    tail = 2 * table[11]
    up_front = qwen3.generate(InputEmbeds(table[ids], steps=rows, tail=tail), GREEDY, use_tqdm=False)[0]
    stream = InputEmbeds(table[ids], closed=False)
    seq = qwen3.add_request({"prompt_embeds": stream}, GREEDY)
    other = qwen3.add_request(ids, GREEDY)
    for _ in range(4):
        qwen3.step()
    assert seq.num_output_tokens == 1 and not seq.is_finished and seq.block_table    # waits for its row 0
    assert other.num_output_tokens > 1                                               # the other one went on
    stream.push(rows[:2])
    for _ in range(4):
        qwen3.step()
    assert seq.num_output_tokens == 3                                                # rows 0, 1 used
    stream.push(rows[2:])
    stream.close(tail)
    while not qwen3.is_finished():
        qwen3.step()
    assert seq.output_token_ids == up_front["token_ids"]


def test_bad_input_embeds(qwen3):
    table = qwen3.runner.model.embed_tokens.weight.detach()
    with pytest.raises(InvalidRequestError) as e:
        qwen3.add_request({"prompt_embeds": torch.zeros(3, table.shape[1] + 1)}, GREEDY)
    assert e.value.param == "prompt_embeds"
    with pytest.raises(InvalidRequestError) as e:
        qwen3.add_request({"prompt_embeds": table[:3], "prompt_token_ids": [1, 2]}, GREEDY)
    assert e.value.param == "prompt_token_ids"
    with pytest.raises(InvalidRequestError) as e:
        qwen3.add_request({"prompt_embeds": table[:3], "prompt": "x"}, GREEDY)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        qwen3.add_request(InputEmbeds(table[:3], positions=torch.zeros(3, 3, dtype=torch.long)), GREEDY)
    assert e.value.param == "positions"                     # qwen3 has no M-RoPE
    with pytest.raises(InvalidRequestError) as e:
        InputEmbeds(table[:3]).push(table[:1])              # closed
    assert e.value.param == "step_embeds"
    assert qwen3.generate(["Hi"], GREEDY, use_tqdm=False)[0]["token_ids"]      # the engine goes on


def test_talker_rejects_thinker_width():
    """The talker takes rows of the thinker's width (its embedding_size), nothing else."""
    talker = make_llm("tiny:qwen2.5-omni", submodel="talker")
    width = talker.arch.input_size
    assert width != talker.arch.hidden_size
    with pytest.raises(InvalidRequestError) as e:
        talker.add_request({"prompt_embeds": torch.zeros(4, talker.arch.hidden_size)}, GREEDY)
    assert e.value.param == "prompt_embeds"
    out = talker.generate({"prompt_embeds": torch.randn(4, width, generator=torch.Generator().manual_seed(0)),
                           "prompt_token_ids": [63, 63, 62, 60]}, GREEDY, use_tqdm=False)[0]
    assert len(out["token_ids"]) == 6
    from omni_ray.ar.structured_outputs import StructuredOutputsParams
    with pytest.raises(InvalidRequestError) as e:      # a text constraint over codec tokens
        talker.add_request([1, 2, 3], SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True)))
    assert e.value.param == "structured_outputs"
    logits = talker.runner.model.compute_logits(torch.randn(3, talker.arch.hidden_size))
    assert torch.isneginf(logits[:, talker.arch.talker.codec_bos]).all()      # the codec start is never sampled
    assert torch.isfinite(logits[:, :talker.arch.talker.codec_bos]).all()


def test_repetition_penalty_equals_transformers(qwen3):
    """``repetition_penalty`` (the talker's 1.05 by default): the processor equals transformers' on random
    logits, and greedy continuations with a penalty equal transformers' generate (and differ from none)."""
    from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

    from omni_ray.ar.layers.sampler import apply_repetition_penalty
    from omni_ray.testing import resolve_model

    g = torch.Generator().manual_seed(0)
    logits, seen = torch.randn(3, 50, generator=g), torch.randint(0, 50, (3, 7), generator=g)
    want = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    got = logits.clone()
    apply_repetition_penalty(got, [0, 1, 2], seen.tolist(), [1.3] * 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    hf = AutoModelForCausalLM.from_pretrained(resolve_model("tiny:qwen3"), dtype=torch.float32).eval()
    ids = qwen3.tokenize("The old lighthouse stood at the edge of the harbour")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                          repetition_penalty=1.5)[0, len(ids):].tolist()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.5)
    outs = qwen3.generate([ids, ids[:4]], [params, GREEDY], use_tqdm=False)      # batched with a plain request
    assert outs[0]["token_ids"] == ref
    assert ref != qwen3.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                 use_tqdm=False)[0]["token_ids"]
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(repetition_penalty=0.0)
    assert e.value.param == "repetition_penalty"


def test_preempted_and_aborted_embeds_requests():
    """Out of KV blocks, a request with step rows is preempted and recomputed (its prompt rows and the
    step rows of its tokens so far again) to the tokens it gets alone; aborting one that waits for its
    next row frees its blocks."""
    llm = make_llm(num_kvcache_blocks=5, max_num_seqs=2, max_model_len=64)
    table = llm.runner.model.embed_tokens.weight.detach()
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    reqs = [(table[list(range(5 + k, 25 + k))], 3 * table[list(range(40 + k, 70 + k))]) for k in (0, 7)]
    alone = [llm.generate(InputEmbeds(p, steps=s), params, use_tqdm=False)[0]["token_ids"] for p, s in reqs]
    both = llm.generate([InputEmbeds(p, steps=s) for p, s in reqs], params, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    assert [o["token_ids"] for o in both] == alone
    stream = InputEmbeds(reqs[0][0], closed=False)
    seq = llm.add_request({"prompt_embeds": stream}, params, request_id="waiting")
    for _ in range(3):
        llm.step()
    assert seq.block_table and not seq.is_finished
    assert llm.abort("waiting") and seq.finish_reason == "abort"
    assert llm.block_manager.num_free_blocks == 5 and llm.is_finished()


def test_readme_talker_example():
    """docs/architecture.md's talker example runs as written and gives codec tokens."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if 'submodel="talker"' in b)
    scope: dict = {}
    exec(compile(block, "architecture.md", "exec"), scope)   # noqa: S102 - the repository's own docs
    assert len(scope["codes"]) == 32 and all(0 <= c < scope["talker"].arch.vocab_size for c in scope["codes"])


def test_fed_from_another_thread(qwen3):
    """generate() over a request whose rows another thread feeds: the engine reports that it waits for
    input (and sleeps on ``input_event`` instead of stepping), each push wakes it, and the tokens equal
    those of the same rows given up front."""
    import threading

    ids = qwen3.tokenize("A lighthouse")
    table = qwen3.runner.model.embed_tokens.weight.detach()
    rows = 3 * table[[7, 8, 9, 10, 11]]                 # max_tokens 6: the first token, then 5 fed steps
    want = qwen3.generate(InputEmbeds(table[ids], steps=rows), GREEDY, use_tqdm=False)[0]["token_ids"]
    stream = InputEmbeds(table[ids], closed=False)
    waited = []
    wait = qwen3.input_event.wait

    def feeder():
        for k in range(rows.shape[0]):
            if not fed.wait(timeout=60):                # the engine is idle, waiting for row k (else: fail, not hang)
                stream.close()
                return
            fed.clear()
            waited.append(qwen3.waits_for_input())
            stream.push(rows[k])

    def spy(timeout=None):                              # the engine's idle wait: let the feeder go on
        fed.set()
        return wait(timeout)

    fed = threading.Event()
    qwen3.input_event.wait = spy
    try:
        thread = threading.Thread(target=feeder, daemon=True)
        thread.start()
        got = qwen3.generate({"prompt_embeds": stream}, GREEDY, use_tqdm=False)[0]["token_ids"]
        thread.join(timeout=60)
    finally:
        del qwen3.input_event.wait
    assert got == want and len(waited) == rows.shape[0] and all(waited)
