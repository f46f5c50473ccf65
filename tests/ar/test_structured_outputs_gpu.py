"""Structured outputs on CUDA: the decode CUDA graphs, the mixed-step graphs and multi-step decode
with constrained rows beside unconstrained ones (xgrammar's Triton mask kernel)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from omni_ray.ar import SamplingParams
from omni_ray.ar.structured_outputs import StructuredOutputsParams as SO
from tests.ar.conftest import PROMPTS, make_llm
from tests.ar.test_structured_outputs import SCHEMA

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_graphs_with_constrained_rows(dtype):
    llm = make_llm(device="cuda", enforce_eager=False, dtype=dtype, warmup=True)
    free = [SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)]
    alone = llm.generate(PROMPTS[:2], free, use_tqdm=False)
    so = [SamplingParams(temperature=t, seed=s, max_tokens=150, structured_outputs=SO(json=SCHEMA))
          for s, t in ((1, 1.0), (2, 0.0))]
    mixed = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]], [free[0], so[0], free[1], so[1]],
                         use_tqdm=False)
    if dtype == "float32":       # bf16: other batch sizes take other GEMM kernels, which may flip a near tie
        assert mixed[0]["token_ids"] == alone[0]["token_ids"] and mixed[2]["token_ids"] == alone[1]["token_ids"]
    for out in (mixed[1], mixed[3]):
        assert out["finish_reason"] == "stop"
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert llm.runner.grammar_masks.steps > 0 and llm.engine_stats()["grammar_matchers"] == 0
    # constrained rows alone: multi-step runs, masked between the graph replays; the same tokens as single steps
    f0, s0 = llm.stats.forwards, llm.stats.steps
    multi = llm.generate(PROMPTS[:2], so, use_tqdm=False)
    assert llm.stats.forwards - f0 > llm.stats.steps - s0
    single = make_llm(device="cuda", enforce_eager=False, dtype=dtype, decode_steps=1).generate(PROMPTS[:2], so,
                                                                                                use_tqdm=False)
    assert [o["token_ids"] for o in multi] == [o["token_ids"] for o in single]
    # a pure unconstrained batch still decodes several steps per launch
    f0, s0 = llm.stats.forwards, llm.stats.steps
    llm.generate(PROMPTS[:2], free, use_tqdm=False)
    assert llm.stats.forwards - f0 > llm.stats.steps - s0
