"""End-to-end latency of a repeated ``text2image-llm-encoder`` request, with and without DiT-cache hits.

The app: an AR stage (Qwen3-0.6B shape) whose prompt hidden states condition a PixArt-Sigma-XL-shaped
DiT (random weights), the DiT cache on. For each of N fresh prompts, three requests:

    miss              new prompt: AR encode -> DiT denoise (20 steps) -> VAE
    conditioning hit  same prompt, another seed: the hidden states come from the cache, the AR stage
                      is skipped; the image is still generated
    image hit         same prompt and seed again: the finished image comes from the cache

    python benchmarks/bench_cache.py            # GPU
    python benchmarks/bench_cache.py --quick    # CPU smoke run on tiny checkpoints
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serve import free_port, ms, pct  # noqa: E402


def app_config(a) -> dict:
    gpu = a.device == "cuda"
    dep = {"num_replicas": 1, "max_ongoing_requests": 64, "num_cpus": 1 if gpu else 0.5, "num_gpus": 0.5 if gpu else 0}
    return {
        "app": {"name": "omni-cache-bench", "ingress": {"num_cpus": 1 if gpu else 0.25}},
        "stages": {
            "llm": {"kind": "ar", "deployment": dep, "engine": {
                "model": {"path": a.ar_model, "name": "llm"}, "device": a.device, "enforce_eager": not gpu,
                "cache": {"block_size": 16 if not gpu else 256, "num_blocks": 512 if not gpu else -1,
                          "gpu_memory_utilization": 0.3},
                "scheduler": {"max_num_seqs": 64, "max_model_len": 2048, "max_num_batched_tokens": 8192}}},
            "image": {"kind": "dit", "deployment": dep, "engine": {
                "model": {"path": a.dit_model, "name": "image"}, "device": a.device, "max_batch_size": 4}},
        },
        "pipelines": {"text2image-llm-encoder": {"steps": [
            {"stage": "llm", "input": "prompt", "output": "hidden_states"},
            {"stage": "image", "input": "hidden_states", "output": "images"}]}},
        "scheduler": {"enabled": True, "detached": False},
        "dit_cache": {"enabled": True, "detached": False, "max_bytes": 1 << 30},
    }


async def run(url: str, a) -> dict:
    import httpx

    kinds = {"miss": [], "conditioning_hit": [], "image_hit": []}
    stages = {k: {"llm": [], "image": []} for k in kinds}
    async with httpx.AsyncClient(base_url=url, timeout=900) as c:
        async def one(kind: str, prompt: str, seed: int, want: str):
            body = {"prompt": prompt, "size": f"{a.size}x{a.size}", "num_inference_steps": a.steps, "seed": seed}
            for _ in range(100):                      # the cache indexes hidden states in the background
                t0 = time.perf_counter()
                r = await c.post("/v1/pipelines/text2image-llm-encoder", json=body)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                enc, dit = r.json()["stages"]
                got = "image_hit" if dit.get("image_cache") == "hit" else (
                    "conditioning_hit" if enc.get("cache") == "hit" else "miss")
                if got == want:
                    break
                await asyncio.sleep(0.05)
                body["seed"] += 1000 if want == "conditioning_hit" else 0
            else:
                raise RuntimeError(f"never got a {want}")
            kinds[kind].append(dt)
            stages[kind]["llm"].append(enc["elapsed_s"])
            stages[kind]["image"].append(dit["elapsed_s"])

        await one("miss", "warm-up prompt", 1, "miss")
        for k in kinds:
            kinds[k].clear(), stages[k]["llm"].clear(), stages[k]["image"].clear()
        for i in range(a.prompts):
            prompt = f"a lighthouse on a cliff at dusk, oil painting, take {i}"
            await one("miss", prompt, 1, "miss")
            await asyncio.sleep(0.3)                   # let the background put land
            await one("conditioning_hit", prompt, 2, "conditioning_hit")
            await one("image_hit", prompt, 2, "image_hit")
    return {k: {"p50_ms": ms(pct(v, 50)), "p99_ms": ms(pct(v, 99)), "n": len(v),
                "llm_stage_p50_ms": ms(pct(stages[k]["llm"], 50)),
                "image_stage_p50_ms": ms(pct(stages[k]["image"], 50))}
            for k, v in kinds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args()
    q = a.quick
    a.device = "cpu" if q else "cuda"
    a.ar_model = "tiny:qwen3" if q else "shape:qwen3-0.6b"
    a.dit_model = "tiny:pixart-llm" if q else "shape:pixart-sigma-llm-0.6b"
    a.prompts = a.prompts or (3 if q else 10)
    a.size = a.size or (64 if q else 512)
    a.steps = a.steps or (2 if q else 20)

    import ray
    import torch
    from ray import serve

    from deployments.app import build_app

    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": app_config(a)}), name="omni-cache-bench", route_prefix="/")
    try:
        res = asyncio.run(run(f"http://127.0.0.1:{port}", a))
    finally:
        serve.shutdown()
        ray.shutdown()
    gpu = torch.cuda.get_device_name(0) if not q and torch.cuda.is_available() else None
    out = {"device": a.device, "gpu": gpu, "ar_model": a.ar_model, "dit_model": a.dit_model, "size": a.size,
           "steps": a.steps, "prompts": a.prompts, **res, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = ROOT / "benchmarks" / "results" / f"cache_{a.device}.json"
    path.write_text(json.dumps(out, indent=2))
    print("| request | p50 ms | p99 ms | AR stage p50 ms | DiT stage p50 ms |\n|---|---|---|---|---|")
    for k in ("miss", "conditioning_hit", "image_hit"):
        r = res[k]
        print(f"| {k} | {r['p50_ms']} | {r['p99_ms']} | {r['llm_stage_p50_ms']} | {r['image_stage_p50_ms']} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
