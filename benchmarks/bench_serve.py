"""Serving overhead of the omni app: HTTP vs the engine, streaming throughput, pipeline stage split.

    python benchmarks/bench_serve.py                 # GPU: shape:qwen3-0.6b + tiny:pixart on cuda
    python benchmarks/bench_serve.py --quick         # CPU smoke run on the tiny checkpoints

Three measurements, each against its own baseline:
  1. latency of a 16-token completion (greedy, ignore_eos), one request at a time:
     the AsyncLLM engine called directly vs POST /v1/completions through Serve (p50 / p99);
     target: <= 10 ms added at p50;
  2. output tokens/s of C concurrent streaming clients (/v1/completions, stream) vs the offline
     engine (LLM.generate) on the same prompts and parameters; target: >= 85 %. Two ways: one
     burst (all C sent at once, 256 tokens each: the arrival of the burst weighs on a short run),
     and sustained (each client sends R requests back to back, output lengths spread over
     128-384, against the offline engine fed by the same C closed-loop clients with no transport
     between; all requests queued at once, at most C in the batch, is reported beside it); each
     side the median of --repeats timed runs (3 on GPU: single runs of a 0.5 s burst drift by
     +-10 %); each burst's engine timeline (engine.step_log) says when the requests reached the
     engine and how long the client waited after its last step;
  3. a text2image pipeline's end-to-end latency and its split by stage (llm, image, the rest).
The direct-engine baselines run first in this process and are freed before Serve starts, so the
two never share the GPU. The HTTP client is aiohttp (benchmarks/load_client.py); one burst is
repeated with httpx, whose own per-request cost showed as 50+ ms of burst arrival.
Writes benchmarks/results/serve_<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import pct  # noqa: E402,F401 - after the path above; other benchmarks import it from here
from benchmarks.step_log import engine_timeline, ms  # noqa: E402

WARM_TOKENS = 8          # each streaming part first runs the same burst with this many tokens (compile, autotune)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- config
def bench_config(a) -> dict:
    gpu = a.device == "cuda"
    llm_dep = {"num_replicas": 1, "max_ongoing_requests": 4 * a.clients, "num_cpus": 1 if gpu else 0.5,
               "num_gpus": 0.5 if gpu else 0}
    dit_dep = {"num_replicas": 1, "max_ongoing_requests": 64, "num_cpus": 1 if gpu else 0.5,
               "num_gpus": 0.5 if gpu else 0}
    llm_engine = {
        "model": {"path": a.ar_model, "name": "llm"}, "device": a.device, "enforce_eager": not gpu,
        "core_process": a.core_process, "step_log": a.step_log,
        "cache": {"block_size": 16 if not gpu else 256, "num_blocks": 1024 if not gpu else -1,
                  "gpu_memory_utilization": 0.5},
        "scheduler": {"max_num_seqs": max(64, 2 * a.clients), "max_model_len": 2048, "max_num_batched_tokens": 8192}}
    # --engine and a variant's engine.KEY=VALUE (top-level fields)
    for k, v in getattr(a, "engine_options", {}).items():
        llm_engine[k] = v.lower() in ("1", "true", "yes", "on") if v.lower() in ("0", "1", "true", "false",
                                                                                 "yes", "no", "on", "off") else v
    return {
        "app": {"name": "omni-bench", "ingress": {"num_cpus": 1 if gpu else 0.25, "max_ongoing_requests": 4096,
                                                  "num_replicas": a.ingress_replicas},
                "stage_call_batch": a.stage_call_batch},
        "stages": {
            "llm": {"kind": "ar", "deployment": llm_dep, "engine": llm_engine},
            "image": {"kind": "dit", "deployment": dit_dep, "engine": {
                "model": {"path": a.dit_model, "name": "image"}, "device": a.device, "max_batch_size": 8}},
        },
        "pipelines": {"text2image": {"steps": [
            {"stage": "llm", "input": "prompt", "output": "text", "max_tokens": a.rewrite_tokens,
             "system_prompt": "Rewrite the user's request as a detailed image description."},
            {"stage": "image", "input": "text", "output": "images"}]}},
        "scheduler": {"enabled": not a.no_scheduler, "max_queue_size": 4096, "detached": False},
        "dit_cache": {"enabled": True, "detached": False},
    }


def prompts(n: int) -> list[str]:
    return [f"{PROMPT} Story number {i}." for i in range(n)]


# ----------------------------------------------------------------------------- baselines
async def direct_latency(cfg, n: int, max_tokens: int) -> list[float]:
    from omni_ray.ar import AsyncLLM, SamplingParams

    engine = AsyncLLM(cfg)
    def params():
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    lat = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        async for out in engine.generate(PROMPT, params(), f"direct-{i}"):
            pass
        if i >= 3:                                   # 3 warm-ups
            lat.append(time.perf_counter() - t0)
    await engine.shutdown()
    return lat


async def direct_stream(cfg, ps: list[str], max_tokens: int, repeats: int) -> dict:
    """The AsyncLLM engine (as the AR replica holds it) with one concurrent caller per prompt; the
    median of ``repeats`` bursts."""
    from omni_ray.ar import AsyncLLM, SamplingParams

    engine = AsyncLLM(cfg)
    held = gpu_bytes_held()

    async def one(i, p, n_tokens=max_tokens):
        first, n = None, 0
        sp = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)
        async for out in engine.generate(p, sp, f"s-{i}-{time.monotonic_ns()}"):
            first = first or time.perf_counter()
            n += len(out.token_ids)
        return n, first

    await asyncio.gather(*(one(i, p, WARM_TOKENS) for i, p in enumerate(ps)))    # warm-up: the same batch shape
    runs = []
    for _ in range(repeats):
        await asyncio.sleep(0.2)
        wall0, t0 = time.time(), time.perf_counter()
        res = await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
        dt = time.perf_counter() - t0
        wall_end = time.time()
        tokens = sum(n for n, _ in res)
        run = {"tokens_per_s": round(tokens / dt, 1), "ttft_p50_ms": ms(pct([f - t0 for _, f in res], 50))}
        if cfg.step_log:
            run["engine_timeline"] = engine_timeline(cfg.step_log, wall0, len(ps), wall_end)
        runs.append(run)
    st = engine.stats()
    await engine.shutdown()
    return median_run(runs) | {"kv_blocks": st.get("num_blocks"), "preemptions": st.get("num_preemptions"),
                               "gpu_bytes_held_by_bench": held}


def median_run(runs: list[dict]) -> dict:
    """The run with the median ``tokens_per_s`` (the lower middle of an even count), with every
    run's figure beside it (how much the repeats spread)."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return ranked[(len(ranked) - 1) // 2] | {"runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs]}


async def handle_stream(ps: list[str], max_tokens: int) -> dict:
    """The AR replica's ``generate`` stream through a Serve handle from this process (no HTTP)."""
    from ray import serve

    from omni_ray.ar.sampling_params import SamplingParams
    from omni_ray.stages import ARRequest

    h = serve.get_deployment_handle("llm", "omni-bench").options(stream=True)

    async def one(i, p, n_tokens=max_tokens):
        req = ARRequest(f"hs-{i}-{time.monotonic_ns()}", prompt=p,
                        params=SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))
        first, n, msgs = None, 0, 0
        async for d in h.generate.remote(req):
            first = first or time.perf_counter()
            n += len(d["token_ids"])
            msgs += 1
        return n, first, msgs

    await asyncio.gather(*(one(i, p, WARM_TOKENS) for i, p in enumerate(ps)))
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
    dt = time.perf_counter() - t0
    return {"tokens_per_s": round(sum(r[0] for r in res) / dt, 1),
            "ttft_p50_ms": ms(pct([r[1] - t0 for r in res], 50)),
            "messages_per_stream": round(statistics.mean(r[2] for r in res), 1)}


async def ingress_handle_stream(ps: list[str], max_tokens: int) -> dict:
    """The ingress's ``stream_text`` through the app handle from this process: admission, the
    ingress replica and the AR replica, without the HTTP proxy. ``ignore_eos``: every stream
    makes exactly ``max_tokens`` tokens."""
    from ray import serve

    h = serve.get_app_handle("omni-bench").options(stream=True)

    async def one(p, n_tokens=max_tokens):
        first, msgs = None, 0
        async for _ in h.stream_text.remote(p, max_tokens=n_tokens, temperature=0, ignore_eos=True):
            first = first or time.perf_counter()
            msgs += 1
        return first, msgs

    await asyncio.gather(*(one(p, WARM_TOKENS) for p in ps))
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(p) for p in ps))
    dt = time.perf_counter() - t0
    firsts = [r[0] - t0 for r in res if r[0] is not None]   # random weights: a stream's text can stay empty
    return {"tokens_per_s": round(len(ps) * max_tokens / dt, 1),
            "ttft_p50_ms": ms(pct(firsts, 50)) if firsts else None, "streams_without_text": len(ps) - len(firsts),
            "messages_per_stream": round(statistics.mean(r[1] for r in res), 1)}


def offline_throughput(cfg, ps: list[str], max_tokens: int, repeats: int) -> dict:
    """``LLM.generate`` on all prompts at once: the median of ``repeats`` timed runs."""
    from omni_ray.ar import LLM, SamplingParams

    llm = LLM(cfg)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=WARM_TOKENS, ignore_eos=True), use_tqdm=False)
    runs = []
    for _ in range(repeats):
        steps0 = llm.stats.steps
        wall0, t0 = time.time(), time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        tokens = sum(len(o["token_ids"]) for o in outs)
        run = {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "steps": llm.stats.steps - steps0}
        if cfg.step_log:
            run["engine_timeline"] = engine_timeline(cfg.step_log, wall0, len(ps), time.time())
        runs.append(run)
    del llm
    return median_run(runs)


def gpu_bytes_held() -> int:
    """GPU memory this process still holds (the baselines must leave the GPU to what runs next)."""
    try:
        import torch
        return torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def free_accelerator() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:
        pass


# ----------------------------------------------------------------------------- through Serve
async def http_latency(url: str, n: int, max_tokens: int, client: str) -> tuple[list[float], dict]:
    """Client-side latencies, and the p50 of each Server-Timing part (ms): ``admit``, ``work``
    (the ingress's stage call), ``engine`` (inside the AR replica), ``total`` (the ingress), plus
    ``proxy_and_network`` (client time - total) and ``ingress_to_replica`` (work - engine)."""
    from benchmarks.load_client import Clients
    from deployments.ingress.timing import parse

    body = {"model": "llm", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    lat, parts = [], []
    async with Clients(url, 1, client, timeout_s=600) as c:
        for i in range(n + 3):
            t0 = time.perf_counter()
            status, headers, out = await c.post(0, "/v1/completions", body)
            dt = time.perf_counter() - t0
            assert status == 200 and out["usage"]["completion_tokens"] == max_tokens, (status, out)
            if i >= 3:
                lat.append(dt)
                t = parse({k.lower(): v for k, v in headers.items()}.get("server-timing", ""))
                t["proxy_and_network"] = 1000 * dt - t.get("total", 0.0)
                if "engine" in t:
                    t["ingress_to_replica"] = t["work"] - t["engine"]
                parts.append(t)
    split = {k: round(pct([p[k] for p in parts if k in p], 50), 2) for k in parts[0]} if parts else {}
    return lat, split


async def latency_parts(url: str, n: int, client: str) -> dict:
    """Where the added latency goes: an HTTP request that touches no stage (proxy + ingress), and
    the AR replica's ``complete`` called through a Serve handle from here (handle + replica)."""
    from ray import serve

    from benchmarks.load_client import Clients
    from omni_ray.ar.sampling_params import SamplingParams
    from omni_ray.stages import ARRequest

    h = serve.get_deployment_handle("llm", "omni-bench")
    req = lambda i: ARRequest(f"part-{i}", prompt=PROMPT,  # noqa: E731
                              params=SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    out = {}
    async with Clients(url, 1, client, timeout_s=60) as c:
        for name, call in (("http_no_stage_ms", lambda i: c.post(0, "/v1/models")),
                           ("handle_complete_ms", lambda i: h.complete.remote(req(i))),
                           ("handle_noop_ms", lambda i: h.info.remote())):
            xs = []
            for i in range(n + 3):
                t0 = time.perf_counter()
                await call(i)
                xs.append(time.perf_counter() - t0)
            out[name] = ms(pct(xs[3:], 50))
    return out


def stream_body(p: str, n_tokens: int) -> dict:
    return {"model": "llm", "prompt": p, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def stream_throughput(url: str | list[str], ps: list[str], max_tokens: int, client: str,
                            step_log: str | None = None, repeats: int = 1) -> dict:
    """Tokens/s of concurrent streaming clients, all sent at once (one burst; the median of
    ``repeats`` bursts after a warm-up one). Several URLs (direct
    ingress, one per ingress replica): clients spread round-robin over them, as a load balancer in
    front of the replicas' target group would spread them. With the engine's ``step_log``: when the
    burst reached the engine and how the engine spent the time after it."""
    from ray import serve

    from benchmarks.load_client import Clients

    runs = []
    async with Clients(url, len(ps), client) as cs:
        await asyncio.gather(*(cs.stream(i, "/v1/completions", stream_body(p, WARM_TOKENS)) for i, p in enumerate(ps)))
        for _ in range(repeats):
            await asyncio.sleep(0.2)           # the previous burst's last steps are logged before this one starts
            cpu0, wall0, t0 = time.process_time(), time.time(), time.perf_counter()
            res = await asyncio.gather(*(cs.stream(i, "/v1/completions", stream_body(p, max_tokens))
                                         for i, p in enumerate(ps)))
            dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            wall_end = time.time()
            tokens = sum(t for t, _, _ in res)
            ttft = [f - t0 for _, f, _ in res if f is not None]
            run = {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "ttft_p50_ms": ms(pct(ttft, 50)),
                   "ttft_min_ms": ms(min(ttft)), "ttft_max_ms": ms(max(ttft)),
                   "chunks_per_stream": round(statistics.mean(c for _, _, c in res), 1), "client_cpu_s": round(cpu, 3)}
            if step_log:
                run["engine_timeline"] = engine_timeline(step_log, wall0, len(ps), wall_end)
            runs.append(run)
    engine = await serve.get_deployment_handle("llm", "omni-bench").stats.remote()
    return median_run(runs) | {"replica_kv_blocks": engine.get("num_blocks"),
                               "replica_preemptions": engine.get("num_preemptions")}


def sustained_work(clients: int, rounds: int, mean_tokens: int) -> list[tuple[str, int]]:
    """clients x rounds requests: distinct prompts, output lengths spread evenly over
    [mean/2, 3 mean/2] (seeded), so that streams end at different times and new ones join a
    running batch, as under real traffic."""
    import random
    rng = random.Random(0)
    return [(f"{PROMPT} Request number {i}.", rng.randint(mean_tokens // 2, 3 * mean_tokens // 2))
            for i in range(clients * rounds)]


def offline_sustained(cfg, work: list[tuple[str, int]], concurrency: int, repeats: int) -> dict:
    """The offline engine on the sustained work, the median of ``repeats`` runs each way:
    ``closed_loop`` (the baseline): the clients' own order, each of ``concurrency`` clients'
    next request added in the very step its previous one ends (what the Serve clients do, with no
    transport between); ``shared_queue``: all requests queued at once, at most ``concurrency`` in
    the batch (a free slot takes whichever request is next, so the run's tail is shorter than any
    set of closed-loop clients can make it)."""
    from omni_ray.ar import LLM

    cfg = cfg.model_copy(deep=True)
    cfg.scheduler.max_num_seqs = concurrency
    llm = LLM(cfg)
    llm.generate([p for p, _ in work[:concurrency]], greedy(WARM_TOKENS), use_tqdm=False)
    out = {}
    for name, run_once in (("closed_loop", closed_loop_run), ("shared_queue", shared_queue_run)):
        runs = []
        for _ in range(repeats):
            wall0, t0 = time.time(), time.perf_counter()
            tokens = run_once(llm, work, concurrency)
            dt = time.perf_counter() - t0
            run = {"requests": len(work), "tokens": tokens, "seconds": round(dt, 3),
                   "tokens_per_s": round(tokens / dt, 1)}
            if cfg.step_log:
                run["engine_timeline"] = engine_timeline(cfg.step_log, wall0, len(work), time.time(), batch=concurrency)
            runs.append(run)
        out[name] = median_run(runs)
    del llm
    return out


def sustained_result(a, offline_sus: dict, serve_run: dict) -> dict:
    base, shared = offline_sus["closed_loop"], offline_sus["shared_queue"]
    return {"clients": a.clients, "rounds": a.sustained_rounds, "offline": base, "offline_shared_queue": shared,
            "serve": serve_run, "ratio": round(serve_run["tokens_per_s"] / base["tokens_per_s"], 3),
            "ratio_vs_shared_queue": round(serve_run["tokens_per_s"] / shared["tokens_per_s"], 3)}


def greedy(n: int):
    from omni_ray.ar import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def shared_queue_run(llm, work: list[tuple[str, int]], clients: int) -> int:
    outs = llm.generate([p for p, _ in work], [greedy(n) for _, n in work], use_tqdm=False)
    return sum(len(o["token_ids"]) for o in outs)


def closed_loop_run(llm, work: list[tuple[str, int]], clients: int) -> int:
    """Client k sends work[k::clients] one after another; returns the output tokens."""
    queues = [iter(work[k::clients]) for k in range(clients)]
    owner: dict[str, int] = {}

    def send(k: int) -> None:
        nxt = next(queues[k], None)
        if nxt is not None:
            owner[llm.add_request(nxt[0], greedy(nxt[1])).request_id] = k

    for k in range(clients):
        send(k)
    tokens = 0
    while not llm.is_finished():
        for seq in llm.step_seqs():
            if seq.is_finished:
                tokens += len(llm.output_of(seq)["token_ids"])
                send(owner.pop(seq.request_id))
    return tokens


async def sustained_stream(urls: list[str], work: list[tuple[str, int]], clients: int, client_kind: str,
                           repeats: int = 1, step_log: str | None = None) -> dict:
    """``clients`` streaming clients, each sending its next request as soon as its previous one
    ends (closed loop, as vLLM's benchmark_serving with --max-concurrency): tokens/s over the run;
    the median of ``repeats`` runs."""
    from benchmarks.load_client import Clients

    async def client(cs, k: int):
        out = []
        for p, n in work[k::clients]:
            sent = time.perf_counter()
            tokens, first, chunks = await cs.stream(k, "/v1/completions", stream_body(p, n))
            out.append((tokens, None if first is None else first - sent, chunks))
        return out

    async with Clients(urls, clients, client_kind) as cs:
        await asyncio.gather(*(cs.stream(i, "/v1/completions", stream_body(p, WARM_TOKENS))
                               for i, (p, _) in enumerate(work[:clients])))
        runs = []
        for _ in range(repeats):
            await asyncio.sleep(0.2)
            wall0, t0 = time.time(), time.perf_counter()
            res = [r for rs in await asyncio.gather(*(client(cs, k) for k in range(clients))) for r in rs]
            dt = time.perf_counter() - t0
            tokens = sum(t for t, _, _ in res)
            ttft = [f for _, f, _ in res if f is not None]
            run = {"requests": len(res), "tokens": tokens, "tokens_expected": sum(n for _, n in work),
                   "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 1),
                   "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p90_ms": ms(pct(ttft, 90))}
            if step_log:
                run["engine_timeline"] = engine_timeline(step_log, wall0, len(work), time.time(), batch=clients)
            runs.append(run)
    return median_run(runs)


async def pipeline_split(url: str, n: int, a) -> dict:
    from benchmarks.load_client import Clients

    e2e, llm, img, rest = [], [], [], []
    async with Clients(url, 1, a.client) as c:
        for i in range(n + 1):
            body = {"prompt": f"a lighthouse at dusk, take {i}", "max_tokens": a.rewrite_tokens,
                    "size": f"{a.image_size}x{a.image_size}", "num_inference_steps": a.steps}  # no seed: no cache hit
            t0 = time.perf_counter()
            status, _, out = await c.post(0, "/v1/pipelines/text2image", body)
            dt = time.perf_counter() - t0
            assert status == 200, out
            st = {s["stage"]: s["elapsed_s"] for s in out["stages"]}
            if i >= 1:
                e2e.append(dt), llm.append(st["llm"]), img.append(st["image"])
                rest.append(dt - st["llm"] - st["image"])
    return {k: {"p50_ms": ms(pct(v, 50)), "p99_ms": ms(pct(v, 99))}
            for k, v in {"end_to_end": e2e, "llm": llm, "image": img, "serving_and_handoff": rest}.items()}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on tiny checkpoints")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda unless --quick)")
    ap.add_argument("--ar-model", default=None)
    ap.add_argument("--dit-model", default="tiny:pixart")
    ap.add_argument("--latency-requests", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--stream-tokens", type=int, default=None)
    ap.add_argument("--sustained-rounds", type=int, default=None,
                    help="sustained streaming: each client sends this many requests back to back (mixed lengths)")
    ap.add_argument("--pipeline-requests", type=int, default=None)
    ap.add_argument("--rewrite-tokens", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-scheduler", action="store_true", help="admit without the omni scheduler (to see its cost)")
    ap.add_argument("--ingress-replicas", type=int, default=1, help="ingress replicas (HTTP/SSE work spread out)")
    ap.add_argument("--stage-call-batch", type=int, default=16,
                    help="app.stage_call_batch: AR streams arriving together share one Serve call (1: one each)")
    ap.add_argument("--core-process", default="auto", choices=["auto", "on", "off"],
                    help="AR engine core in its own process (auto: on for CUDA)")
    ap.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the Ray cluster the benchmark starts (Serve's own knobs, e.g. "
                         "RAY_SERVE_THROUGHPUT_OPTIMIZED=1); repeatable")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for the cluster); "
                         "HTTP goes straight to the ingress replica's own port, not through the proxy")
    ap.add_argument("--only-streaming", action="store_true",
                    help="only the streaming parts (baselines once, then each --variant's Serve app in turn); "
                         "writes serve_streaming_<device>.json")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:OPTS",
                    help="with --only-streaming: a Serve set-up to measure, e.g. 'tp:RAY_SERVE_THROUGHPUT_OPTIMIZED=1' "
                         "'direct:direct_ingress=1' or 'ingress4:ingress_replicas=4' (comma-separated; "
                         "NAME=VALUE in upper case is cluster "
                         "environment, engine.FIELD=VALUE the Serve app's AR engine config, e.g. "
                         "'inline:direct_ingress=1,engine.core_send_thread=0'); repeatable, "
                         "default: one run as configured")
    ap.add_argument("--engine", action="append", default=[], metavar="FIELD=VALUE",
                    help="an AR engine config field for every side (offline, AsyncLLM and the Serve app), e.g. "
                         "async_decode=1; repeatable")
    ap.add_argument("--client", default="aiohttp", choices=["aiohttp", "httpx"],
                    help="HTTP client of the measurements (benchmarks/load_client.py); "
                         "one burst also runs with the other")
    ap.add_argument("--step-log", default=None,
                    help="the AR engine's step log (engine.step_log) to time bursts with (default: a file under /tmp)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs of each throughput measurement (offline, engine, bursts, sustained); "
                         "medians reported")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    q = a.quick
    a.device = a.device or ("cpu" if q else "cuda")
    a.ar_model = a.ar_model or ("tiny:qwen3" if q else "shape:qwen3-0.6b")
    a.latency_requests = a.latency_requests or (10 if q else 100)
    a.clients = a.clients or (8 if q else 64)
    a.stream_tokens = a.stream_tokens or (32 if q else 256)
    a.sustained_rounds = a.sustained_rounds or (2 if q else 4)
    a.pipeline_requests = a.pipeline_requests or (3 if q else 10)
    a.image_size = a.image_size or (64 if q else 512)
    a.steps = a.steps or (2 if q else 20)
    a.repeats = a.repeats or (1 if q else 3)
    if q:
        a.rewrite_tokens = min(a.rewrite_tokens, 8)
    a.step_log = a.step_log or f"/tmp/omni-bench-steps-{os.getpid()}.jsonl"
    a.engine_options = dict(kv.split("=", 1) for kv in a.engine)

    import torch

    from omni_ray.config import OmniConfig, load_config

    cfg_dict = bench_config(a)
    cfg: OmniConfig = load_config(cfg_dict)
    ar_cfg = cfg.stages["llm"].engine
    ps = prompts(a.clients)

    if not a.only_streaming:
        print(f"[1/5] direct engine latency ({a.latency_requests} x 16 tokens) ...", flush=True)
        direct = asyncio.run(direct_latency(ar_cfg, a.latency_requests, 16))
        free_accelerator()
    print(f"[2/5] offline throughput ({a.clients} prompts x {a.stream_tokens} tokens) ...", flush=True)
    offline = offline_throughput(ar_cfg, ps, a.stream_tokens, a.repeats)
    free_accelerator()
    print(f"      GPU memory still held by this process: {gpu_bytes_held() / 2**30:.2f} GiB", flush=True)
    print(f"      {offline['tokens_per_s']:.0f} tok/s offline; AsyncLLM with {a.clients} callers ...", flush=True)
    engine_streams = asyncio.run(direct_stream(ar_cfg, ps, a.stream_tokens, a.repeats))
    print(f"      {engine_streams}", flush=True)
    free_accelerator()
    work = sustained_work(a.clients, a.sustained_rounds, a.stream_tokens)
    offline_sus = offline_sustained(ar_cfg, work, a.clients, a.repeats)
    free_accelerator()
    print(f"      sustained ({len(work)} requests, {a.clients} clients): {offline_sus}", flush=True)

    if a.only_streaming:
        return streaming_variants(a, offline, engine_streams, ps, work, offline_sus)

    print("[3/5] starting Serve ...", flush=True)
    serve_env = dict(kv.split("=", 1) for kv in a.serve_env)
    t0 = time.perf_counter()
    urls = start_serve(a, serve_env)
    url = urls[0]
    startup = time.perf_counter() - t0
    try:
        print("[3/5] HTTP latency ...", flush=True)
        http, server_timing = asyncio.run(http_latency(url, a.latency_requests, 16, a.client))
        parts = asyncio.run(latency_parts(url, a.latency_requests, a.client))
        print(f"[4/5] {a.clients} streaming clients ...", flush=True)
        replica_streams = asyncio.run(handle_stream(ps, a.stream_tokens))
        print(f"      AR replica via handle: {replica_streams}", flush=True)
        ingress_streams = asyncio.run(ingress_handle_stream(ps, a.stream_tokens))
        print(f"      ingress via app handle: {ingress_streams}", flush=True)
        online = asyncio.run(stream_throughput(urls, ps, a.stream_tokens, a.client, a.step_log, a.repeats))
        print(f"      {online['tokens_per_s']:.0f} tok/s through Serve vs {offline['tokens_per_s']:.0f} offline, "
              f"TTFT p50 {online['ttft_p50_ms']} ms (min {online['ttft_min_ms']}, max {online['ttft_max_ms']}), "
              f"{online['chunks_per_stream']} chunks per stream", flush=True)
        print(f"      bursts: {online['runs_tokens_per_s']} tok/s; offline {offline['runs_tokens_per_s']}", flush=True)
        other = "httpx" if a.client == "aiohttp" else "aiohttp"
        other_client = asyncio.run(stream_throughput(urls, ps, a.stream_tokens, other, a.step_log))
        print(f"      the same burst from an {other} client: {other_client['tokens_per_s']:.0f} tok/s, TTFT p50 "
              f"{other_client['ttft_p50_ms']} ms (min {other_client['ttft_min_ms']})", flush=True)
        sustained = asyncio.run(sustained_stream(urls, work, a.clients, a.client, a.repeats, a.step_log))
        print(f"      sustained: {sustained['tokens_per_s']:.0f} tok/s through Serve vs "
              f"{offline_sus['closed_loop']['tokens_per_s']:.0f} offline (closed loop; "
              f"{offline_sus['shared_queue']['tokens_per_s']:.0f} shared queue), "
              f"TTFT p50 {sustained['ttft_p50_ms']} ms "
              f"(p90 {sustained['ttft_p90_ms']})", flush=True)
        print(f"[5/5] text2image x {a.pipeline_requests} ...", flush=True)
        split = asyncio.run(pipeline_split(url, a.pipeline_requests, a))
    finally:
        stop_serve(serve_env)

    lat = {"direct": {"p50_ms": ms(pct(direct, 50)), "p99_ms": ms(pct(direct, 99)), "n": len(direct)},
           "http": {"p50_ms": ms(pct(http, 50)), "p99_ms": ms(pct(http, 99)), "n": len(http)}}
    lat["added_p50_ms"] = round(lat["http"]["p50_ms"] - lat["direct"]["p50_ms"], 2)
    lat["added_p99_ms"] = round(lat["http"]["p99_ms"] - lat["direct"]["p99_ms"], 2)
    ratio = online["tokens_per_s"] / offline["tokens_per_s"]
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" and torch.cuda.is_available() else None
    result = {
        "device": a.device, "gpu": gpu, "quick": q, "ar_model": a.ar_model, "dit_model": a.dit_model,
        "engine_options": a.engine_options,
        "scheduler": not a.no_scheduler, "core_process": a.core_process, "ingress_replicas": a.ingress_replicas,
        "stage_call_batch": a.stage_call_batch,
        "serve_env": serve_env, "direct_ingress": a.direct_ingress,
        "host": platform.node(), "cpus": os.cpu_count(), "serve_startup_s": round(startup, 1),
        "latency_16_tokens": lat | {"target_added_p50_ms": 10, "meets_target": lat["added_p50_ms"] <= 10,
                                    "parts_p50": parts, "server_timing_p50_ms": server_timing},
        "streaming": {"clients": a.clients, "max_tokens": a.stream_tokens,
                      "offline_tokens_per_s": round(offline["tokens_per_s"], 1), "offline_steps": offline["steps"],
                      "offline_engine_timeline": offline.get("engine_timeline"),
                      "serve_tokens_per_s": round(online["tokens_per_s"], 1),
                      "serve_ttft_p50_ms": online["ttft_p50_ms"], "client_cpu_s": online["client_cpu_s"],
                      "serve_ttft_min_max_ms": [online["ttft_min_ms"], online["ttft_max_ms"]],
                      "serve_chunks_per_stream": online["chunks_per_stream"],
                      "engine_timeline": online.get("engine_timeline"),
                      "repeats": a.repeats, "serve_runs_tokens_per_s": online["runs_tokens_per_s"],
                      "offline_runs_tokens_per_s": offline["runs_tokens_per_s"],
                      "client": a.client,
                      "other_client": {"client": other} | {k: other_client.get(k) for k in (
                          "tokens_per_s", "ttft_p50_ms", "ttft_min_ms", "ttft_max_ms", "engine_timeline")},
                      "parts": {"engine_async_callers": engine_streams, "ar_replica_handle": replica_streams,
                                "ingress_handle": ingress_streams},
                      "ratio": round(ratio, 3), "target_ratio": 0.85, "meets_target": ratio >= 0.85,
                      "sustained": sustained_result(a, offline_sus, sustained)},
        "text2image": {"requests": a.pipeline_requests, "size": a.image_size, "steps": a.steps,
                       "rewrite_tokens": a.rewrite_tokens, **split},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"serve_{a.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwrote {out}")


def start_serve(a, env: dict[str, str]) -> list[str]:
    """A fresh Ray cluster (with ``env``) running the benchmark app; returns the URLs the HTTP parts
    use: the Serve proxy's, or with ``a.direct_ingress`` each ingress replica's own port."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.ingress.endpoints import direct_ingress_urls

    if a.direct_ingress:
        env = env | {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    os.environ.update(env)            # the processes ray.init starts inherit it; this one read its flags already
    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": bench_config(a)}), name="omni-bench", route_prefix="/")
    if a.direct_ingress:
        urls = direct_ingress_urls("omni-bench", timeout_s=30, expect=a.ingress_replicas)
        if not urls:
            raise SystemExit("--direct-ingress: Serve reports no direct ingress ports")
        print(f"      direct ingress: {urls} (proxy: port {port})", flush=True)
        return ["http://127.0.0.1:" + u.rsplit(":", 1)[1] for u in urls]   # one node: its servers bind to 127.0.0.1
    return [f"http://127.0.0.1:{port}"]


def stop_serve(env: dict[str, str]) -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    for k in list(env) + ["RAY_SERVE_THROUGHPUT_OPTIMIZED"]:
        os.environ.pop(k, None)


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    """'name:KEY=V,opt=V' -> (name, cluster env, benchmark options)."""
    name, _, opts = spec.partition(":")
    env, args = {}, {}
    for kv in filter(None, opts.split(",")):
        k, v = kv.split("=", 1)
        (env if k.isupper() else args)[k] = v
    return name, env, args


def streaming_variants(a, offline: dict, engine_streams: dict, ps: list[str], work, offline_sus: dict) -> None:
    """Each variant: start Serve, stream through the AR replica handle, the ingress handle and HTTP
    (median of ``repeats`` bursts), sustained, stop. Shows which hop loses what, and what Serve's
    knobs change."""
    import copy

    variants = [parse_variant(v) for v in a.variant] or [("as-configured", {}, {})]
    out = {"device": a.device, "ar_model": a.ar_model, "engine_options": a.engine_options, "clients": a.clients,
           "max_tokens": a.stream_tokens,
           "cpus": os.cpu_count(), "repeats": a.repeats, "offline_tokens_per_s": round(offline["tokens_per_s"], 1),
           "offline_runs_tokens_per_s": offline["runs_tokens_per_s"],
           "engine_async_callers": engine_streams, "offline_sustained": offline_sus, "variants": {}}
    for name, env, opts in variants:
        va = copy.copy(a)
        va.engine_options = dict(a.engine_options)
        for k, v in opts.items():
            if k.startswith("engine."):       # the Serve app's AR engine config, e.g. engine.core_send_thread=0
                va.engine_options[k[len("engine."):]] = v
                continue
            kind = type(getattr(a, k))
            setattr(va, k, v.lower() in ("1", "true", "yes") if kind is bool else kind(v))
        print(f"== variant {name}: env {env}, options {opts}", flush=True)
        urls = start_serve(va, env)
        try:
            r = {"env": env, "options": opts, "http_urls": len(urls),
                 "ar_replica_handle": asyncio.run(handle_stream(ps, a.stream_tokens)),
                 "ingress_handle": asyncio.run(ingress_handle_stream(ps, a.stream_tokens))}
            h = asyncio.run(stream_throughput(urls, ps, a.stream_tokens, a.client, a.step_log, a.repeats))
            r["http"] = {k: h.get(k) for k in ("tokens_per_s", "runs_tokens_per_s", "ttft_p50_ms", "ttft_min_ms",
                                               "ttft_max_ms", "chunks_per_stream", "engine_timeline")}
            for k in ("ar_replica_handle", "ingress_handle", "http"):
                r[k]["ratio"] = round(r[k]["tokens_per_s"] / offline["tokens_per_s"], 3)
            r["http_sustained"] = asyncio.run(sustained_stream(urls, work, a.clients, a.client, a.repeats, a.step_log))
            r["http_sustained"]["ratio"] = round(r["http_sustained"]["tokens_per_s"]
                                                 / offline_sus["closed_loop"]["tokens_per_s"], 3)
            print(f"   {json.dumps(r)}", flush=True)
            out["variants"][name] = r
        finally:
            stop_serve(env)
    out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = Path(a.out or ROOT / "benchmarks" / "results" / f"serve_streaming_{a.device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print("| variant | AR replica handle | ingress handle | HTTP (median burst) | HTTP TTFT p50 ms | HTTP sustained |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in out["variants"].items():
        print(f"| {name} | {r['ar_replica_handle']['ratio']:.0%} | {r['ingress_handle']['ratio']:.0%} "
              f"| {r['http']['ratio']:.0%} | {r['http']['ttft_p50_ms']} | {r['http_sustained']['ratio']:.0%} |")
    print(f"\nwrote {path}")


def table(r: dict) -> str:
    lat, st, t2i = r["latency_16_tokens"], r["streaming"], r["text2image"]
    rows = [
        f"## omni-ray serving ({r['device']}{', ' + r['gpu'] if r['gpu'] else ''}; {r['ar_model']} + {r['dit_model']}"
        f"{'; quick' if r['quick'] else ''})",
        "",
        "| measurement | baseline | through Serve | difference | target |",
        "| --- | --- | --- | --- | --- |",
        f"| 16-token completion p50 | {lat['direct']['p50_ms']} ms (engine) | {lat['http']['p50_ms']} ms (HTTP) "
        f"| +{lat['added_p50_ms']} ms | <= +10 ms {'OK' if lat['meets_target'] else 'MISSED'} |",
        f"| 16-token completion p99 | {lat['direct']['p99_ms']} ms | {lat['http']['p99_ms']} ms "
        f"| +{lat['added_p99_ms']} ms | |",
        f"| output tok/s, {st['clients']} streams x {st['max_tokens']} | {st['offline_tokens_per_s']} (offline LLM) "
        f"| {st['serve_tokens_per_s']} (TTFT p50 {st['serve_ttft_p50_ms']} ms) | {100 * st['ratio']:.1f} % "
        f"| >= 85 % {'OK' if st['meets_target'] else 'MISSED'} |",
    ]
    if "sustained" in st:
        su = st["sustained"]
        rows.append(f"| output tok/s, {su['clients']} clients x {su['rounds']} requests back to back (mixed lengths) "
                    f"| {su['offline']['tokens_per_s']} (offline LLM, the same {su['clients']} closed-loop clients) "
                    f"| {su['serve']['tokens_per_s']} | {100 * su['ratio']:.1f} % "
                    f"| >= 85 % {'OK' if su['ratio'] >= 0.85 else 'MISSED'} |")
        rows.append(f"| the same, against all requests queued at once ({su['clients']} at a time) "
                    f"| {su['offline_shared_queue']['tokens_per_s']} (offline LLM) "
                    f"| {su['serve']['tokens_per_s']} | {100 * su['ratio_vs_shared_queue']:.1f} % | |")
    rows += [
        "",
        "Streaming parts: " + ", ".join(f"{k} {v['tokens_per_s']} tok/s (TTFT p50 {v['ttft_p50_ms']} ms)"
                                        for k, v in st.get("parts", {}).items()),
        "",
        "Latency parts (p50): " + ", ".join(f"{k} {v}" for k, v in lat.get("parts_p50", {}).items()),
        "",
        "HTTP request split by its Server-Timing header (p50 ms): "
        + ", ".join(f"{k} {v}" for k, v in lat.get("server_timing_p50_ms", {}).items()),
        "",
        f"text2image ({t2i['size']}x{t2i['size']}, {t2i['steps']} steps, rewrite <= {t2i['rewrite_tokens']} tokens), "
        f"{t2i['requests']} requests:",
        "",
        "| part | p50 ms | p99 ms |",
        "| --- | --- | --- |",
    ]
    for k in ("llm", "image", "serving_and_handoff", "end_to_end"):
        rows.append(f"| {k} | {t2i[k]['p50_ms']} | {t2i[k]['p99_ms']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
