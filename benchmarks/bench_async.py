"""AsyncLLM (the serving engine) under C concurrent streaming callers vs the offline engine.

    python benchmarks/bench_async.py                       # GPU: shape:qwen3-0.6b, 64 callers x 256 tokens
    python benchmarks/bench_async.py --quick               # CPU: tiny:qwen3

For each engine core (thread, process) two rounds of C callers (the second shows what warm-up
hides), output tokens/s and time to first token; with the thread core also the slowest engine
steps (batch composition and duration), which is where a stall shows.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_serve import free_accelerator, ms, pct, prompts  # noqa: E402


async def rounds(engine, ps, max_tokens, n_rounds=2) -> list[dict]:
    from omni_ray.ar import SamplingParams

    async def one(tag, i, p):
        first, n = None, 0
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        async for out in engine.generate(p, params, f"{tag}-{i}"):
            first = first or time.perf_counter()
            n += len(out.token_ids)
        return n, first

    await asyncio.gather(*(one("warm", i, p) for i, p in enumerate(ps[:4])))
    out = []
    for r in range(n_rounds):
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(f"r{r}", i, p) for i, p in enumerate(ps)))
        dt = time.perf_counter() - t0
        ttft = [f - t0 for _, f in res]
        out.append({"tokens_per_s": round(sum(n for n, _ in res) / dt, 1), "seconds": round(dt, 3),
                    "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_max_ms": ms(max(ttft))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    a = ap.parse_args()
    from omni_ray.ar import LLM, AsyncLLM, SamplingParams
    from omni_ray.config import AREngineConfig

    gpu = not a.quick
    clients, tokens = a.clients or (64 if gpu else 16), a.tokens or (256 if gpu else 32)
    base = {"model": {"path": "shape:qwen3-0.6b" if gpu else "tiny:qwen3"}, "device": "cuda" if gpu else "cpu",
            "enforce_eager": not gpu, "cache": {"block_size": 256 if gpu else 16, "num_blocks": -1 if gpu else 1024,
                                                "gpu_memory_utilization": 0.5},
            "scheduler": {"max_num_seqs": 128, "max_model_len": 2048, "max_num_batched_tokens": 8192}}
    ps = prompts(clients)
    llm = LLM(AREngineConfig.model_validate(base))
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate(ps[:4], sp, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(ps, sp, use_tqdm=False)
    offline = sum(len(o["token_ids"]) for o in outs) / (time.perf_counter() - t0)
    del llm, outs
    free_accelerator()
    print(f"offline: {offline:.0f} tok/s ({clients} prompts x {tokens})", flush=True)
    result = {"model": base["model"]["path"], "clients": clients, "tokens": tokens,
              "offline_tokens_per_s": round(offline, 1)}
    for core in ("on", "off"):           # the child process frees its GPU memory when it exits
        engine = AsyncLLM(AREngineConfig.model_validate(base | {"core_process": core}))
        steps = []
        if engine.engine is not None:                  # thread core: time each engine step
            eng = engine.engine
            step = eng.step

            def timed():
                b = len(eng.scheduler.running) + len(eng.scheduler.waiting)
                t = time.perf_counter()
                r = step()
                steps.append((time.perf_counter() - t, b, eng.stats.prefill_tokens))
                return r
            eng.step = timed
        res = asyncio.run(rounds(engine, ps, tokens))
        st = engine.stats()
        print(f"core_process={core}: {res}; KV blocks {st['num_blocks']}, preemptions {st['num_preemptions']}",
              flush=True)
        if steps:
            worst = sorted(steps, reverse=True)[:5]
            print("  slowest steps (s, seqs, prefill tokens so far):",
                  [(round(d, 4), b, p) for d, b, p in worst], f"of {len(steps)}", flush=True)
        result[f"core_process_{core}"] = {"rounds": res, "kv_blocks": st["num_blocks"],
                                          "preemptions": st["num_preemptions"]}
        asyncio.run(engine.shutdown())
        del engine
        free_accelerator()


    from benchmarks.common import write_result
    print("wrote", write_result(f"async_{'cuda' if gpu else 'cpu_quick'}.json", result))


if __name__ == "__main__":
    main()
