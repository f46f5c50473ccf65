"""What ``SamplingParams.return_hidden_states`` costs a generating engine (a thinker streaming its states to
its talker): decode tokens per second and time to first token with the flag off and on, offline
(``LLM``: the runner's copies out of the CUDA graphs' hidden-state buffer) and through ``AsyncLLM``'s
child-process core (the rows pickled as numpy across its pipe, merged per caller). Rows per second and
their bytes are printed beside. Default model: the Qwen2.5-Omni-7B thinker's language-model shape
(``shape:qwen2.5-vl-7b``: Qwen2.5-7B, hidden 3584; random bf16 weights), greedy, EOS ignored.

    python benchmarks/bench_hidden_states.py                                  # GPU: concurrency 1, 16, 64
    python benchmarks/bench_hidden_states.py --model tiny:qwen3 --tokens 16 --concurrency 1 4   # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from benchmarks.common import device_name, sync, table, write_result

PROMPT = "Describe the harbour at dawn, the boats, the gulls and the people who work there, in detail. "


def params(tokens: int, hidden: bool):
    from omni_ray.ar import SamplingParams

    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, return_hidden_states=hidden)


def run_offline(llm, n: int, tokens: int, hidden: bool) -> dict:
    prompts = [f"{i} {PROMPT}" for i in range(n)]
    sync()
    t0 = time.perf_counter()
    seqs = [llm.add_request(p, params(tokens, hidden)) for p in prompts]
    first: dict[int, float] = {}
    while not llm.is_finished():
        llm.step_seqs()
        now = time.perf_counter()
        for s in seqs:
            if s.num_output_tokens and s.seq_id not in first:
                first[s.seq_id] = now - t0
    total = time.perf_counter() - t0
    rows = sum(s.num_hidden_rows for s in seqs)
    return dict(ttft_ms=1e3 * sum(first.values()) / n, total_s=total, tok_per_s=n * tokens / total,
                rows_per_s=rows / total)


def run_async(engine, n: int, tokens: int, hidden: bool, tag: str) -> dict:
    async def one(i: int):
        t0, first, rows = time.perf_counter(), None, 0
        async for out in engine.generate(f"{i} {PROMPT}", params(tokens, hidden), f"{tag}-{i}"):
            first = first if first is not None or not out.token_ids else time.perf_counter() - t0
            rows += 0 if out.hidden_states is None else out.hidden_states.shape[0]
        return first, rows

    async def main():
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0, got

    total, got = asyncio.run(main())
    return dict(ttft_ms=1e3 * sum(f for f, _ in got) / n, total_s=total, tok_per_s=n * tokens / total,
                rows_per_s=sum(r for _, r in got) / total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shape:qwen2.5-vl-7b")
    ap.add_argument("--tokens", type=int, default=256, help="generated tokens per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--no-async", action="store_true", help="skip the AsyncLLM (child-process core) runs")
    args = ap.parse_args()
    from omni_ray.ar import LLM, AsyncLLM
    from omni_ray.config import AREngineConfig

    cuda = torch.cuda.is_available()
    kw = dict(max_model_len=1024, enforce_eager=not cuda, device="cuda" if cuda else "cpu")
    rows = []
    if not args.no_async:            # first: its child process gives the GPU back before LLM takes it here
        engine = AsyncLLM(AREngineConfig.from_kwargs(args.model, core_process="on", **kw))
        try:
            run_async(engine, 2, 8, True, "warm")
            for c in args.concurrency:
                for flag in (False, True):
                    rows.append(dict(engine="AsyncLLM", concurrency=c, hidden=flag,
                                     **run_async(engine, c, args.tokens, flag, f"c{c}-{flag}")))
        finally:
            asyncio.run(engine.shutdown())
    llm = LLM(args.model, **kw)
    hidden_size = llm.arch.hidden_size
    run_offline(llm, 2, 8, True)                                                  # warm-up
    for c in args.concurrency:
        for flag in (False, True):
            rows.append(dict(engine="LLM", concurrency=c, hidden=flag, **run_offline(llm, c, args.tokens, flag)))
    for r in rows:
        r["rows_MB_per_s"] = r["rows_per_s"] * hidden_size * 4 / 1e6
    print(f"return_hidden_states cost: {args.model} (hidden {hidden_size}), {device_name()}, "
          f"{args.tokens} tokens per request")
    print(table(rows, ["engine", "concurrency", "hidden", "ttft_ms", "total_s", "tok_per_s", "rows_per_s",
                       "rows_MB_per_s"]))
    name = f"hidden_states_{'cuda' if cuda else 'cpu_quick'}.json"
    print(write_result(name, dict(args=vars(args), rows=rows)))


if __name__ == "__main__":
    main()
