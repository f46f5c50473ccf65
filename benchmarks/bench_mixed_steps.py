"""Steps that carry prompt tokens, CUDA graph vs eager, by token count: what ``mixed_graph_tokens``
buys when a burst of requests joins a running batch (the serving case).

    python benchmarks/bench_mixed_steps.py            # GPU: Qwen3-0.6B shape, random weights

For each engine (``mixed_graph_tokens`` 0 = eager, and each limit given), at ``max_num_seqs``
(the graphs' fixed grid grows with it): 64 requests decode, then M prompts of ~40 tokens join in
one step; that step's time (median of 5) for M in 4 .. 44, i.e. ~240 .. 2000 tokens.
Writes benchmarks/results/mixed_steps_<device>.json.
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
from benchmarks.common import table, write_result  # noqa: E402
from omni_ray.ar import LLM, SamplingParams  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Story number {}."


def joining_step_ms(llm, joiners: int, repeats: int = 5) -> tuple[int, float]:
    """(tokens, ms) of the step in which ``joiners`` prompts join 64 decoding sequences."""
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    times, tokens = [], 0
    for r in range(repeats):
        for i in range(64):
            llm.add_request(PROMPT.format(f"{r}-{i}"), sp, f"run-{joiners}-{r}-{i}")
        for _ in range(3):                                  # prefill, then decodes
            llm.step()
        for i in range(joiners):
            llm.add_request(PROMPT.format(f"j{r}-{i}"), sp, f"join-{joiners}-{r}-{i}")
        t0 = time.perf_counter()
        llm.step()
        times.append(time.perf_counter() - t0)
        tokens = llm.last_step[2]
        while not llm.is_finished():
            llm.step()
    return tokens, 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shape:qwen3-0.6b")
    ap.add_argument("--limits", default="0,512,2048", help="mixed_graph_tokens values to compare (0: eager)")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--joiners", default="4,8,16,32,44")
    a = ap.parse_args()
    limits = [int(x) for x in a.limits.split(",")]
    joiners = [int(x) for x in a.joiners.split(",")]
    rows = []
    for limit in limits:
        llm = LLM(a.model, mixed_graph_tokens=limit, max_num_seqs=a.max_num_seqs, max_model_len=2048,
                  enable_prefix_caching=False, gpu_memory_utilization=0.4)
        for m in joiners:
            tokens, step_ms = joining_step_ms(llm, m)
            rows.append({"mixed_graph_tokens": limit, "joining_prompts": m, "step_tokens": tokens,
                         "step_ms": round(step_ms, 2)})
            print(rows[-1], flush=True)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(table(rows, ["mixed_graph_tokens", "joining_prompts", "step_tokens", "step_ms"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("wrote", write_result(f"mixed_steps_{device}.json", {"model": a.model, "max_num_seqs": a.max_num_seqs,
                                                                "rows": rows}))


if __name__ == "__main__":
    main()
