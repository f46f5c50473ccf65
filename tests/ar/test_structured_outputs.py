"""Structured outputs on the tiny random-weight Qwen3 (CPU): its weights make no JSON on their own,
so every valid output below is the grammar's doing."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from omni_ray.ar import SamplingParams
from omni_ray.ar.structured_outputs import StructuredOutputsParams as SO
from omni_ray.errors import InvalidRequestError
from tests.ar.conftest import PROMPTS, make_llm

# nested objects, enums, arrays, integer ranges, required fields; strings by pattern (see the note
# on maxLength in docs/serving.md: xgrammar 0.2.9 lets control characters into maxLength strings)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "size": {"type": "object",
                 "properties": {"w": {"type": "integer", "minimum": 0, "maximum": 999},
                                "unit": {"enum": ["cm", "in"]}},
                 "required": ["w", "unit"], "additionalProperties": False},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "kind", "tags", "size", "ok"],
    "additionalProperties": False,
}


def constrained(seed: int | None = None, temperature: float = 1.0, max_tokens: int = 120, **so) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=SO(**(so or {"json": SCHEMA})))


def test_json_schema_output_validates_every_time(qwen3):
    params = [constrained(seed) for seed in range(6)]
    outs = qwen3.generate([PROMPTS[i % 4] for i in range(6)], params, use_tqdm=False)
    for out in outs:
        assert out["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert len({o["text"] for o in outs}) > 1                      # sampled, not one fixed string
    assert qwen3.engine_stats()["grammar_matchers"] == 0            # each freed when it finished


def test_without_a_constraint_the_model_makes_no_json(qwen3):
    outs = qwen3.generate(PROMPTS[:2], SamplingParams(temperature=1.0, seed=0, max_tokens=60), use_tqdm=False)
    for out in outs:
        with pytest.raises(ValueError):
            json.loads(out["text"])


def test_unconstrained_rows_of_a_mixed_batch_are_unchanged(qwen3):
    free = [SamplingParams(temperature=1.0, seed=11, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)]
    alone = qwen3.generate(PROMPTS[:2], free, use_tqdm=False)
    mixed = qwen3.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]],
                           [free[0], constrained(1), free[1], constrained(2, temperature=0.0)], use_tqdm=False)
    assert mixed[0]["token_ids"] == alone[0]["token_ids"]
    assert mixed[2]["token_ids"] == alone[1]["token_ids"]
    for out in (mixed[1], mixed[3]):
        jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_multi_step_decode_with_constrained_rows_equals_single_steps(qwen3):
    """A run of k decode steps masks each step on the host between the forwards (the matchers follow
    the run's tokens, then roll back for the engine): the same tokens as one step per launch."""
    params = [constrained(s, temperature=t) for s, t in ((1, 1.0), (2, 0.0), (3, 0.7))]
    params.append(SamplingParams(temperature=0.8, seed=4, max_tokens=50, ignore_eos=True))
    single = make_llm(decode_steps=1).generate(PROMPTS, params, use_tqdm=False)
    f0, s0 = qwen3.stats.forwards, qwen3.stats.steps
    multi = qwen3.generate(PROMPTS, params, use_tqdm=False)
    assert qwen3.stats.forwards - f0 > qwen3.stats.steps - s0               # multi-step runs happened
    assert [o["token_ids"] for o in multi] == [o["token_ids"] for o in single]
    assert [o["finish_reason"] for o in multi] == [o["finish_reason"] for o in single]
    for o in multi[:3]:
        jsonschema.validate(json.loads(o["text"]), SCHEMA)
    assert qwen3.engine_stats()["grammar_matchers"] == 0


def test_constrained_output_does_not_depend_on_the_batch(qwen3):
    alone = qwen3.generate([PROMPTS[1]], constrained(5), use_tqdm=False)[0]
    batch = qwen3.generate(PROMPTS[:3], [SamplingParams(temperature=0.9, seed=1, max_tokens=30), constrained(5),
                                         constrained(6)], use_tqdm=False)
    assert batch[1]["token_ids"] == alone["token_ids"]


def test_json_object_regex_choice_and_grammar(qwen3):
    outs = qwen3.generate(PROMPTS[:4], [
        constrained(0, max_tokens=80, json_object=True),
        constrained(1, max_tokens=30, regex=r"[a-z]{3}-\d{2,4}"),
        constrained(2, max_tokens=30, choice=["yes", "no", 'say "maybe"']),
        constrained(3, max_tokens=40, grammar='root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'),
    ], use_tqdm=False)
    assert outs[1]["finish_reason"] == "stop" and re.fullmatch(r"[a-z]{3}-\d{2,4}", outs[1]["text"])
    assert outs[2]["finish_reason"] == "stop" and outs[2]["text"] in ("yes", "no", 'say "maybe"')
    assert re.fullmatch(r"\((\d+)( \+ \d+)*\)", outs[3]["text"]), outs[3]
    if outs[0]["finish_reason"] == "stop":                    # any JSON object: it may not close in time
        assert isinstance(json.loads(outs[0]["text"]), dict)
    else:
        assert outs[0]["text"].startswith("{")


def test_too_few_tokens_end_by_length_with_cut_off_json(qwen3):
    out = qwen3.generate([PROMPTS[0]], constrained(0, max_tokens=5), use_tqdm=False)[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 5
    assert out["text"].startswith("{")
    with pytest.raises(ValueError):
        json.loads(out["text"])
    assert qwen3.engine_stats()["grammar_matchers"] == 0


@pytest.mark.parametrize("so, param, message", [
    (SO(json={"type": "object", "properties": {"a": {"type": "nope"}}}, param="response_format"),
     "response_format", "nope"),
    (SO(json=[1, 2], param="response_format"), "response_format", "object"),
    (SO(regex="([a-z", param="guided_regex"), "guided_regex", "regex"),
    (SO(grammar="root ::= ", param="structured_outputs"), "structured_outputs", "grammar"),
])
def test_a_bad_constraint_is_refused_at_add_request_and_the_engine_serves_on(qwen3, so, param, message):
    with pytest.raises(InvalidRequestError) as e:
        qwen3.add_request(PROMPTS[0], SamplingParams(structured_outputs=so))
    assert e.value.param == param and message in str(e.value)
    assert "/project/cpp" not in str(e.value) and qwen3.is_finished()
    out = qwen3.generate([PROMPTS[1]], constrained(0), use_tqdm=False)[0]
    jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_abort_mid_generation_frees_the_matcher(qwen3):
    seq = qwen3.add_request(PROMPTS[0], constrained(0, max_tokens=100), "so-abort")
    while seq.num_output_tokens < 3:
        qwen3.step()
    assert qwen3.engine_stats()["grammar_matchers"] == 1
    assert qwen3.abort("so-abort")
    assert qwen3.engine_stats()["grammar_matchers"] == 0 and seq.grammar.matcher is None
    assert qwen3.is_finished()


def test_identical_constraints_compile_once(qwen3):
    before = qwen3.grammar.num_compiled
    schema = {"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"]}
    qwen3.generate(PROMPTS[:3], [constrained(s, json=schema) for s in range(3)], use_tqdm=False)
    assert qwen3.grammar.num_compiled == before + 1


def test_a_slow_compilation_blocks_only_its_own_request():
    llm = make_llm()
    gate, compile_ = threading.Event(), llm.grammar._compile

    def slow(grammar, param):
        assert gate.wait(60)
        return compile_(grammar, param)

    llm.grammar._compile = slow
    waiting = llm.add_request(PROMPTS[0], constrained(0, json={"type": "object", "properties": {
        "slow": {"type": "boolean"}}, "required": ["slow"]}))
    free = llm.add_request(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    while not free.is_finished:
        llm.step()
    assert waiting.num_output_tokens == 0 and not waiting.is_finished
    assert llm.engine_stats()["grammar_compiling"] == 1
    gate.set()
    while not llm.is_finished():
        llm.step()
    assert json.loads(llm.output_of(waiting)["text"]) in ({"slow": True}, {"slow": False})


def test_a_constraint_that_fails_to_compile_fails_only_its_request():
    llm = make_llm()

    def broken(grammar, param):
        raise InvalidRequestError(f"{param}: cannot compile the constraint: too big", param=param)

    llm.grammar._compile = broken
    bad = llm.add_request(PROMPTS[0], constrained(0))
    ok = llm.add_request(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    failed = []
    while not llm.is_finished():
        failed += [s for s in llm.step_seqs() if s.error is not None]
    assert failed == [bad] and bad.error.param == "structured_outputs" and bad.finish_reason == "error"
    assert ok.finish_reason == "length"


@pytest.mark.parametrize("core", ["off", "on"], ids=["thread-core", "process-core"])
def test_async_stream_constrained_and_a_caller_that_leaves_frees_its_matcher(core):
    import asyncio

    from omni_ray.ar import AsyncLLM
    from omni_ray.config import AREngineConfig

    eng = AsyncLLM(AREngineConfig.from_kwargs("tiny:qwen3", core_process=core, enforce_eager=True, device="cpu",
                                              kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=512))

    async def main():
        text = "".join([o.text async for o in eng.generate(PROMPTS[0], constrained(3), "full")])
        gen = eng.generate(PROMPTS[1], constrained(4, max_tokens=200), "leaves")
        await gen.__anext__()
        await gen.aclose()                                    # the caller goes away mid-generation
        for _ in range(200):
            await asyncio.sleep(0.02)
            if eng.stats()["grammar_matchers"] == 0:
                break
        with pytest.raises(InvalidRequestError) as e:
            await eng.generate(PROMPTS[2], SamplingParams(structured_outputs=SO(regex="([")), "bad").__anext__()
        after = [o async for o in eng.generate(PROMPTS[2], constrained(5, choice=["x", "y"]), "after")]
        return text, e.value, after

    try:
        text, err, after = asyncio.run(main())
    finally:
        asyncio.run(eng.shutdown())
    jsonschema.validate(json.loads(text), SCHEMA)
    assert eng.stats()["grammar_matchers"] == 0
    assert err.param == "structured_outputs"
    assert "".join(o.text for o in after) in ("x", "y") and after[-1].finish_reason == "stop"


def test_preempted_constrained_sequences_resume_their_grammar(qwen3):
    """Preemption recomputes a sequence's KV; its matcher keeps its place: the output is the same
    as without preemption, and valid."""
    params = [constrained(s, max_tokens=40, regex=r"[a-z]{1,4}( [a-z]{1,4}){4,6}\.") for s in range(12)]
    want = [o["token_ids"] for o in qwen3.generate(PROMPTS * 3, params, use_tqdm=False)]
    llm = make_llm(num_kvcache_blocks=8, max_model_len=128, enable_prefix_caching=False)
    got = llm.generate(PROMPTS * 3, params, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    assert [o["token_ids"] for o in got] == want
    for o in got:
        assert o["finish_reason"] == "length" or re.fullmatch(r"[a-z]{1,4}( [a-z]{1,4}){4,6}\.", o["text"]), o
    assert sum(o["finish_reason"] == "stop" for o in got) >= 6
