"""Structured outputs under tensor parallelism (CPU, gloo, 2 ranks): rank 0 masks and samples the
constrained rows; the tokens equal one rank's."""

from __future__ import annotations

import json

import jsonschema
import pytest

from omni_ray.ar import LLM, SamplingParams
from omni_ray.ar.structured_outputs import StructuredOutputsParams as SO
from tests.ar.tensor_parallel.test_tp_engine import KW, PROMPTS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

SCHEMA = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99}},
          "required": ["k", "n"], "additionalProperties": False}


def test_tp2_constrained_rows_equal_tp1(ray_local):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured_outputs=SO(json=SCHEMA))
              if i % 2 == 0 else SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
              for i in range(len(PROMPTS))]
    ref = LLM("tiny:qwen3-wide", **KW)
    want = ref.generate(PROMPTS, params, use_tqdm=False)
    ref.shutdown()
    llm = LLM("tiny:qwen3-wide", tensor_parallel_size=2, **KW)
    try:
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
        for o in got[::2]:
            jsonschema.validate(json.loads(o["text"]), SCHEMA)
    finally:
        llm.shutdown()
