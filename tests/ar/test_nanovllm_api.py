"""nano-vllm's reference examples, run as written but for the import and the model path, plus
the ``step()`` contract, the defaults and the argument checks of its API.

The examples are the text of GeeeekExplorer/nano-vllm's README quick start, ``example.py`` (chat
template), ``bench.py`` (token-id prompts, one SamplingParams per prompt) and the manual
``add_request`` / ``step`` / ``is_finished`` loop of its ``LLMEngine.generate``."""

from __future__ import annotations

import textwrap

import pytest

from omni_ray.testing import resolve_model

IMPORT = ("from nanovllm import LLM, SamplingParams", "from omni_ray import LLM, SamplingParams")

README = '''
from nanovllm import LLM, SamplingParams
llm = LLM("/YOUR/MODEL/PATH", enforce_eager=True, tensor_parallel_size=1)
sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
prompts = ["Hello, Nano-vLLM."]
outputs = llm.generate(prompts, sampling_params)
outputs[0]["text"]
'''

EXAMPLE_PY = '''
import os
from nanovllm import LLM, SamplingParams
from transformers import AutoTokenizer


def main():
    path = os.path.expanduser("~/huggingface/Qwen3-0.6B/")
    tokenizer = AutoTokenizer.from_pretrained(path)
    llm = LLM(path, enforce_eager=True, tensor_parallel_size=1)

    sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
    prompts = [
        "introduce yourself",
        "list all prime numbers within 100",
    ]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for prompt in prompts
    ]
    outputs = llm.generate(prompts, sampling_params)

    for prompt, output in zip(prompts, outputs):
        print("\\n")
        print(f"Prompt: {prompt!r}")
        print(f"Completion: {output['text']!r}")


if __name__ == "__main__":
    main()
'''

BENCH_PY = '''
import os
import time
from random import randint, seed
from nanovllm import LLM, SamplingParams
# from vllm import LLM, SamplingParams


def main():
    seed(0)
    num_seqs = 256
    max_input_len = 1024
    max_ouput_len = 1024

    path = os.path.expanduser("~/huggingface/Qwen3-0.6B/")
    llm = LLM(path, enforce_eager=False, max_model_len=4096)

    prompt_token_ids = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    sampling_params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_ouput_len)) for _ in range(num_seqs)]
    # uncomment the following line for vllm
    # prompt_token_ids = [dict(prompt_token_ids=p) for p in prompt_token_ids]

    llm.generate(["Benchmark: "], SamplingParams())
    t = time.time()
    llm.generate(prompt_token_ids, sampling_params, use_tqdm=False)
    t = (time.time() - t)
    total_tokens = sum(sp.max_tokens for sp in sampling_params)
    throughput = total_tokens / t
    print(f"Total: {total_tokens}tok, Time: {t:.2f}s, Throughput: {throughput:.2f}tok/s")


if __name__ == "__main__":
    main()
'''

# the loop of nano-vllm's LLMEngine.generate, as a user writes it by hand
MANUAL_LOOP = '''
from nanovllm import LLM, SamplingParams
llm = LLM("/YOUR/MODEL/PATH", enforce_eager=True)
prompts = ["Hello, Nano-vLLM.", "list all prime numbers within 100", [1, 2, 3, 4]]
for prompt in prompts:
    llm.add_request(prompt, SamplingParams(temperature=0.6, max_tokens=32))
outputs = {}
while not llm.is_finished():
    output, num_tokens = llm.step()
    for seq_id, token_ids in output:
        outputs[seq_id] = token_ids
outputs = [outputs[seq_id] for seq_id in sorted(outputs.keys())]
outputs = [{"text": llm.tokenizer.decode(token_ids), "token_ids": token_ids} for token_ids in outputs]
'''


def run_example(source: str, model_dir: str) -> dict:
    """Exec ``source`` with only the import and the model path replaced; its globals after."""
    src = textwrap.dedent(source).replace(*IMPORT)
    for path in ('"/YOUR/MODEL/PATH"', 'os.path.expanduser("~/huggingface/Qwen3-0.6B/")'):
        src = src.replace(path, repr(model_dir))
    assert "nanovllm" not in src.replace("# from vllm", "")
    scope = {"__name__": "__main__"}
    exec(compile(src, "<nano-vllm example>", "exec"), scope)          # noqa: S102 - our own test text
    return scope


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(resolve_model("tiny:qwen3"))


@pytest.fixture(scope="module")
def wide_vocab_dir(tmp_path_factory) -> str:
    """The tiny Qwen3 with a 16k vocabulary: bench.py draws prompt token ids from [0, 10000]."""
    from omni_ray.testing import tiny_ar

    _, template, kw = tiny_ar.TINY_AR["qwen3"]
    out = tmp_path_factory.mktemp("qwen3-16k")
    shapes = dict(tiny_ar.SHAPES)
    tiny_ar.SHAPES["qwen3-16k"] = ("Qwen3Config", template, dict(kw, vocab_size=16384))
    try:
        tiny_ar.build_ar(out, "qwen3-16k")
    finally:
        tiny_ar.SHAPES.clear()
        tiny_ar.SHAPES.update(shapes)
    return str(out)


def test_readme_quick_start(model_dir):
    scope = run_example(README, model_dir)
    out = scope["outputs"]
    assert len(out) == 1 and isinstance(out[0]["text"], str)
    assert 1 <= len(out[0]["token_ids"]) <= 256


def test_example_py_chat_template(model_dir, capsys):
    run_example(EXAMPLE_PY, model_dir)
    printed = capsys.readouterr().out
    assert printed.count("Completion: ") == 2 and "introduce yourself" in printed


def test_bench_py_token_ids_and_per_prompt_params(wide_vocab_dir, capsys):
    """bench.py as written but for its three sizes (256 prompts of up to 1024 + 1024 tokens take
    over 15 minutes on two CPU cores): token-id prompts, one SamplingParams per prompt."""
    small = BENCH_PY.replace("num_seqs = 256", "num_seqs = 6").replace(
        "max_input_len = 1024", "max_input_len = 120").replace("max_ouput_len = 1024", "max_ouput_len = 110")
    assert small.count("= 6\n") + small.count("= 120\n") + small.count("= 110\n") == 3
    run_example(small, wide_vocab_dir)
    printed = capsys.readouterr().out
    total = int(printed.split("Total: ")[1].split("tok")[0])
    assert "Throughput:" in printed and 6 * 100 <= total <= 6 * 110


def test_manual_add_request_step_loop(model_dir):
    scope = run_example(MANUAL_LOOP, model_dir)
    outs, llm = scope["outputs"], scope["llm"]
    assert len(outs) == 3 and all(1 <= len(o["token_ids"]) <= 32 for o in outs)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


# ----------------------------------------------------------------------------- the contract
def test_step_returns_finished_outputs_and_signed_token_counts(qwen3):
    from omni_ray import SamplingParams

    a = qwen3.add_request("The old lighthouse", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    b = qwen3.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    counts, finished = [], {}
    while not qwen3.is_finished():
        outputs, num_tokens = qwen3.step()
        counts.append(num_tokens)
        for seq_id, token_ids in outputs:
            finished[seq_id] = token_ids
    assert counts[0] == a.num_prompt_tokens + b.num_prompt_tokens       # one prefill step of both prompts
    assert all(n < 0 for n in counts[1:])                              # then pure decode steps
    assert -sum(counts[1:]) == (5 - 1) + (9 - 1)                       # minus the decode tokens
    assert finished == {a.seq_id: a.output_token_ids, b.seq_id: b.output_token_ids}
    assert [len(finished[a.seq_id]), len(finished[b.seq_id])] == [5, 9]


def test_defaults_and_list_length_check(qwen3):
    from omni_ray import LLM, SamplingParams
    from omni_ray.ar import LLMEngine

    assert LLM is LLMEngine and SamplingParams().max_tokens == 16
    out = qwen3.generate(["Hi"], SamplingParams(temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 16
    free = qwen3.block_manager.num_free_blocks
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        qwen3.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        qwen3.generate(["a"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    assert qwen3.is_finished() and qwen3.block_manager.num_free_blocks == free     # nothing was queued
