"""What log-probabilities cost: decode throughput of a batch with no row asking, with half the rows
asking for ``logprobs=k`` (the chosen token's and k alternatives, CUDA-graph multi-step runs), and
the time of prompt logprobs (``echo`` + ``logprobs``: every prompt position's logits).

    python benchmarks/bench_logprobs.py                 # GPU: Qwen3-0.6B shape, random weights

Rows: ``none`` (nobody asks), ``half-k`` (rows 0, 2, 4, ... ask for k alternatives), ``all-k``;
decode tok/s (median of 3 runs of batch ``--batch`` x ``--tokens`` greedy tokens), and prompt-only
requests (max_tokens=0) with and without ``prompt_logprobs``. Writes
benchmarks/results/logprobs_<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import sync, table, write_result  # noqa: E402
from omni_ray.ar import LLM, SamplingParams  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Story number {}."


def decode_tok_s(llm, batch: int, tokens: int, ask, repeats: int = 3) -> float:
    """Generated tokens per second of ``batch`` greedy requests (``ask(i)``: row i's logprobs or None)."""
    rates = []
    for r in range(repeats):
        params = [SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=ask(i))
                  for i in range(batch)]
        prompts = [PROMPT.format(f"{r}-{i}") for i in range(batch)]
        sync()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
        rates.append(sum(len(o["token_ids"]) for o in outs) / (time.perf_counter() - t0))
    return statistics.median(rates)


def prompt_ms(llm, n: int, length: int, k: int | None, repeats: int = 3) -> float:
    """ms for ``n`` prompt-only requests of ~``length`` tokens, with prompt_logprobs=k (None: off)."""
    words = " ".join(f"w{j}" for j in range(length))
    times = []
    for r in range(repeats):
        params = SamplingParams(max_tokens=0, prompt_logprobs=k)
        sync()
        t0 = time.perf_counter()
        llm.generate([f"{r} {i} {words}" for i in range(n)], params, use_tqdm=False)
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shape:qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", default="0,5,20", help="alternatives asked by the rows that ask")
    a = ap.parse_args()
    ks = [int(x) for x in a.k.split(",")]
    llm = LLM(a.model, max_num_seqs=max(a.batch, 64), max_model_len=2048, enable_prefix_caching=False,
              gpu_memory_utilization=0.5)
    decode_tok_s(llm, a.batch, 16, lambda i: None, repeats=1)               # warm-up
    rows = []
    base = decode_tok_s(llm, a.batch, a.tokens, lambda i: None)
    rows.append({"rows_asking": "none", "k": "-", "decode_tok_s": round(base), "vs_none": 1.0})
    for k in ks:
        for name, ask in (("half", lambda i, k=k: k if i % 2 == 0 else None), ("all", lambda i, k=k: k)):
            rate = decode_tok_s(llm, a.batch, a.tokens, ask)
            rows.append({"rows_asking": name, "k": k, "decode_tok_s": round(rate), "vs_none": round(rate / base, 3)})
            print(rows[-1], flush=True)
    print(table(rows, ["rows_asking", "k", "decode_tok_s", "vs_none"]))
    prompts = []
    for k in (None, 1, 20):
        ms = prompt_ms(llm, 16, 500, k)
        prompts.append({"prompt_logprobs": "off" if k is None else k, "requests": 16, "ms": round(ms, 1)})
    print(table(prompts, ["prompt_logprobs", "requests", "ms"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("wrote", write_result(f"logprobs_{device}.json", {"model": a.model, "batch": a.batch, "tokens": a.tokens,
                                                              "decode": rows, "prompt_only": prompts}))
    del llm
    gc.collect()


if __name__ == "__main__":
    main()
