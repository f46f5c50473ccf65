"""Where a short request's time goes in the AR engine: step by step, under bursts, through AsyncLLM.

    python benchmarks/profile_request.py                     # GPU: shape:qwen3-0.6b
    python benchmarks/profile_request.py --device cpu --model tiny:qwen3
    python benchmarks/profile_request.py --variant graphs: --variant eager:mixed_graph_tokens=0

Prints, for a 16-token greedy completion of the serving benchmark's prompt: each engine step's
wall time (prefill, then the multi-step decodes) and the total; the step times of 64 such
requests arriving at once and arriving one per step (each joining the running batch: the
serving case); with ``--trace``, torch.profiler tables of a prefill and a mixed step; then the
latency of the request through AsyncLLM with the engine in a child process and in a thread.
``--variant`` repeats the engine part with other engine settings. Writes
benchmarks/results/profile_request_<device>.json."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serve import PROMPT, free_accelerator  # noqa: E402
from benchmarks.common import sync, write_result  # noqa: E402


def engine_config(a, **over) -> dict:
    gpu = a.device == "cuda"
    return {"model": {"path": a.model, "name": "llm"}, "device": a.device, "enforce_eager": not gpu,
            "cache": {"block_size": 256 if gpu else 16, "num_blocks": -1 if gpu else 256,
                      "gpu_memory_utilization": 0.4},
            "scheduler": {"max_num_seqs": 128, "max_model_len": 2048}} | a.engine_over | over


def offline_steps(a) -> dict:
    from omni_ray.ar import SamplingParams
    from omni_ray.ar.engine.llm_engine import LLMEngine
    from omni_ray.config import AREngineConfig

    eng = LLMEngine(AREngineConfig.model_validate(engine_config(a)))
    sp = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
    runs = []
    for i in range(a.repeat + 2):
        sync()
        t0 = time.perf_counter()
        eng.add_request(PROMPT, sp, f"p-{i}")
        t_add = time.perf_counter() - t0
        steps = []
        while not eng.is_finished():
            s0 = time.perf_counter()
            eng.step()
            steps.append(1000 * (time.perf_counter() - s0))
        runs.append({"total_ms": 1000 * (time.perf_counter() - t0), "add_ms": 1000 * t_add, "steps_ms": steps})
    runs = runs[2:]                                          # 2 warm-ups
    out = {"total_ms_p50": round(statistics.median(r["total_ms"] for r in runs), 2),
           "add_ms_p50": round(statistics.median(r["add_ms"] for r in runs), 3),
           "steps_ms_p50": [round(statistics.median(r["steps_ms"][j] for r in runs), 2)
                            for j in range(len(runs[0]["steps_ms"]))],
           "prompt_tokens": len(eng.tokenize(PROMPT)), "decode_steps": eng.config.decode_steps}
    out["burst"] = burst_steps(eng, a)
    if a.trace:
        out["trace"] = trace_steps(eng, sp)
    del eng
    free_accelerator()
    return out


def burst_steps(eng, a) -> dict:
    """Step times of a burst of 64: all arriving at once, then (the serving case) one joining a
    running batch of 63 decodes every step: a mixed prefill + decode step each time."""
    from omni_ray.ar import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    res = {}
    for name, per_step in (("all_at_once", 64), ("one_per_step", 1)):
        for j in range(2):                                         # the second round is measured
            k, steps = 0, []
            while k < 64 or not eng.is_finished():
                for _ in range(min(per_step, 64 - k)):
                    eng.add_request(f"{PROMPT} Story number {k}.", sp, f"b-{name}-{j}-{k}")
                    k += 1
                sync()
                s0 = time.perf_counter()
                eng.step()
                sync()
                steps.append(1000 * (time.perf_counter() - s0))
        res[name] = {"steps": len(steps), "total_ms": round(sum(steps), 1),
                     "first_steps_ms": [round(x, 2) for x in steps[:8]],
                     "step_ms_p50": round(statistics.median(steps), 2)}
    print("burst:", res, flush=True)
    return res


def trace_steps(eng, sp) -> dict:
    """torch.profiler over a lone prefill step and over a mixed step (one prompt joining 63
    running decodes): the ops that take the host's and the device's time. Each kind runs once
    untimed-by-the-profiler (its wall time printed), then once traced."""
    from torch.profiler import ProfilerActivity, profile

    from omni_ray.ar import SamplingParams

    def traced(tag: str) -> list[dict]:
        eng.add_request(PROMPT, sp, f"{tag}-a")
        sync()
        t0 = time.perf_counter()
        eng.step()
        sync()
        print(f"  untraced step {1000 * (time.perf_counter() - t0):.2f} ms", flush=True)
        eng.add_request(PROMPT, sp, f"{tag}-b")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            eng.step()
            sync()
        ka = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        dev = sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))[:8]
        rows = [{"op": e.key[:60], "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                 "device_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 2)} for e in ka]
        rows += [{"op": "device: " + e.key[:52], "calls": e.count, "self_cpu_ms": 0.0,
                  "device_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 2)} for e in dev]
        for r in rows:
            print(f"  {r['op']:60s} {r['calls']:5d} self cpu {r['self_cpu_ms']:7.2f} dev {r['device_ms']:6.2f}",
                  flush=True)
        return rows

    out = {}
    print(" prefill step:")
    out["prefill"] = traced("trace-prefill")
    while not eng.is_finished():
        eng.step()
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for k in range(62):
        eng.add_request(f"{PROMPT} Story number {k}.", long, f"t-{k}")
    eng.step()
    eng.step()
    print(" mixed step (1 prefill + 62-63 decodes):")
    out["mixed"] = traced("trace-mixed")
    while not eng.is_finished():
        eng.step()
    return out


async def async_latency(a, core: str) -> dict:
    from omni_ray.ar import AsyncLLM, SamplingParams
    from omni_ray.config import AREngineConfig

    engine = AsyncLLM(AREngineConfig.model_validate(engine_config(a, core_process=core)))
    lat, first, gaps = [], [], []
    for i in range(a.repeat + 3):
        t0 = time.perf_counter()
        t_first, stamps = None, []
        async for _ in engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=a.tokens,
                                                              ignore_eos=True), f"a-{i}"):
            stamps.append(time.perf_counter())
            t_first = t_first or stamps[-1]
        if i >= 3:
            lat.append(1000 * (time.perf_counter() - t0))
            first.append(1000 * (t_first - t0))
            gaps.append([round(1000 * (y - x), 2) for x, y in zip(stamps, stamps[1:])])
    await engine.shutdown()
    return {"latency_ms_p50": round(statistics.median(lat), 2),
            "first_output_ms_p50": round(statistics.median(first), 2),
            "output_gaps_ms_last_run": gaps[-1]}


async def async_burst(a, n: int = 64, tokens: int = 256) -> dict:
    """``n`` AsyncLLM callers at once (engine core process), after a warm-up burst of 8 tokens,
    as bench_serve's baseline does; slow steps show in the engine core's log."""
    from omni_ray.ar import AsyncLLM, SamplingParams
    from omni_ray.config import AREngineConfig

    engine = AsyncLLM(AREngineConfig.model_validate(engine_config(a, core_process="on")))

    async def one(i, m):
        t0, first = time.perf_counter(), None
        async for _ in engine.generate(f"{PROMPT} Story number {i}.", SamplingParams(
                temperature=0.0, max_tokens=m, ignore_eos=True), f"burst-{m}-{i}"):
            first = first or time.perf_counter() - t0
        return first

    res = {}
    for name, m in (("warm", 8), ("first", tokens), ("second", tokens)):
        t0 = time.perf_counter()
        firsts = await asyncio.gather(*(one(i, m) for i in range(n)))
        res[name] = {"seconds": round(time.perf_counter() - t0, 3),
                     "ttft_p50_ms": round(1000 * statistics.median(firsts), 1)}
    await engine.shutdown()
    print("AsyncLLM bursts:", res, flush=True)
    return res


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    over = {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=", 1)
        over[k] = int(v) if v.lstrip("-").isdigit() else v
    return name, over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=None, help="default: shape:qwen3-0.6b on cuda, tiny:qwen3 on cpu")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--trace", action="store_true", help="torch.profiler tables of a prefill and a mixed step")
    ap.add_argument("--no-async", action="store_true", help="the engine only, not AsyncLLM")
    ap.add_argument("--variant", action="append", default=[],
                    help="engine settings to compare, e.g. 'eager:mixed_graph_tokens=0,elementwise=compile' "
                         "(repeatable; the async part uses the first)")
    a = ap.parse_args()
    a.model = a.model or ("shape:qwen3-0.6b" if a.device == "cuda" else "tiny:qwen3")
    r = {"model": a.model, "device": a.device, "tokens": a.tokens}
    variants = [parse_variant(v) for v in a.variant] or [("default", {})]
    for name, over in variants:
        a.engine_over = over
        key = "offline" if len(variants) == 1 else f"offline_{name}"
        r[key] = offline_steps(a) | {"settings": over}
        print(f"{key}:", {k: v for k, v in r[key].items() if k != "trace"}, flush=True)
    a.engine_over = variants[0][1]
    if not a.no_async:
        r["async_bursts"] = asyncio.run(async_burst(a))
    for core in () if a.no_async else ("on", "off"):
        r[f"async_core_process_{core}"] = asyncio.run(async_latency(a, core))
        print(f"AsyncLLM core_process={core}:", r[f"async_core_process_{core}"], flush=True)
    print("wrote", write_result(f"profile_request_{a.device}.json", r))


if __name__ == "__main__":
    main()
