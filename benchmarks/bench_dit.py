"""DiT engine vs the diffusers pipeline, on PixArt-Sigma-XL's shape with random weights (bf16).

    python benchmarks/bench_dit.py                          # GPU: shape:pixart-sigma-xl
    python benchmarks/bench_dit.py --compile                # + torch.compile'd blocks in the engine
    python benchmarks/bench_dit.py --quick                  # CPU smoke run on tiny:pixart

1. throughput: 16 concurrent requests at 512 px, step counts uniform in [10, 30] (seeded); the
   engine batches them step by step, diffusers runs them one after another.
2. step caching: speedup and PSNR vs the uncached image of the same seed, per method/threshold.
   The weights are random, so the quality side of this curve says little about a trained model.
3. latency: one 1024 px image, engine vs diffusers.
Both sides get the same precomputed caption embeddings (the pipeline's own T5 padding to 300
tokens), so the text encoder is out of the timing. Results: benchmarks/results/dit_<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, psnr, table, write_result  # noqa: E402
from omni_ray.config import DiTEngineConfig, ModelConfig  # noqa: E402
from omni_ray.dit import DiffusionParams, DiTEngine  # noqa: E402

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk, oil painting", "a bowl of ramen, studio photo",
           "an astronaut riding a horse", "a watercolor of a city street in rain", "a macro photo of a bee",
           "a castle on a cliff above the sea", "a cat wearing sunglasses", "a forest path in autumn",
           "a robot reading a book", "a steaming cup of coffee on a desk", "mountains under the milky way",
           "a vintage car on route 66", "a koi pond from above", "a sailboat in a storm", "a field of tulips"]


def make_pipeline(engine: DiTEngine):
    from diffusers import PixArtSigmaPipeline

    f = engine.family
    sched = type(f.base_scheduler).from_config(f.base_scheduler.config)
    pipe = PixArtSigmaPipeline(tokenizer=f.tokenizer, text_encoder=f.text_encoder, vae=f.vae,
                               transformer=f.transformer, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embed_prompts(pipe, prompts: list[str]) -> list[dict]:
    """The pipeline's own conditioning (300 padded T5 tokens + mask, and the "" negative)."""
    out = []
    for p in prompts:
        pe, pm, ne, nm = pipe.encode_prompt(p, do_classifier_free_guidance=True, negative_prompt="",
                                            device=pipe.transformer.device, clean_caption=False)
        out.append(dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                        negative_prompt_attention_mask=nm))
    return out


def run_pipeline(pipe, conds: list[dict], size: int, steps: list[int], seeds: list[int]) -> list[np.ndarray]:
    imgs = []
    for c, n, s in zip(conds, steps, seeds):
        gen = torch.Generator(pipe.transformer.device).manual_seed(s)
        out = pipe(prompt=None, height=size, width=size, num_inference_steps=n, guidance_scale=4.5, generator=gen,
                   use_resolution_binning=False, output_type="np", negative_prompt=None, **c).images
        imgs.append(out[0])
    return imgs


def run_engine(engine: DiTEngine, conds: list[dict], size: int, steps: list[int], seeds: list[int],
               cache=None) -> list[np.ndarray]:
    params = [DiffusionParams(height=size, width=size, num_inference_steps=n, guidance_scale=4.5, seed=s,
                              cache=cache) for n, s in zip(steps, seeds)]
    return engine.generate(None, params, prompt_embeds=[c["prompt_embeds"][0] for c in conds],
                           prompt_mask=[c["prompt_attention_mask"][0] for c in conds], use_tqdm=False,
                           output_type="np")


def bench_throughput(engine, pipe, conds, a) -> dict:
    rng = random.Random(0)
    steps = [rng.randint(a.min_steps, a.max_steps) for _ in range(a.num_requests)]
    seeds = list(range(a.num_requests))
    conds = [conds[i % len(conds)] for i in range(a.num_requests)]
    # warm up both; the engine sees every batch size of the run once (CUDA graphs are captured on first use)
    run_engine(engine, conds, a.size, [1 + i % a.max_steps for i in range(a.num_requests)], seeds)
    run_pipeline(pipe, conds[:1], a.size, [2], seeds[:1])
    st0 = engine.engine_stats()
    with Timer() as te:
        eng_imgs = run_engine(engine, conds, a.size, steps, seeds)
    st1 = engine.engine_stats()
    with Timer() as td:
        ref_imgs = run_pipeline(pipe, conds, a.size, steps, seeds)
    forwards = st1["steps"] - st0["steps"]
    return {"requests": a.num_requests, "size": a.size, "steps": steps, "engine_s": te.s, "diffusers_s": td.s,
            "engine_img_per_s": a.num_requests / te.s, "diffusers_img_per_s": a.num_requests / td.s,
            "speedup": td.s / te.s, "engine_forwards": forwards,
            "avg_batch_images": sum(steps) / forwards if forwards else 0.0,
            "min_psnr_vs_diffusers": min(psnr(x, y) for x, y in zip(eng_imgs, ref_imgs))}


def bench_cache(engine, conds, a) -> list[dict]:
    n, seeds = a.cache_requests, list(range(100, 100 + a.cache_requests))
    steps, conds = [a.cache_steps] * n, [conds[i % len(conds)] for i in range(n)]
    for cache in (None, {"method": "fbcache", "threshold": 0.3}, {"method": "teacache", "threshold": 0.3}):
        run_engine(engine, conds, a.size, steps, seeds, cache=cache)   # warm up (compile, capture graphs)
    rows = []
    with Timer() as t0:
        base = run_engine(engine, conds, a.size, steps, seeds)
    rows.append({"method": "off", "threshold": 0.0, "seconds": t0.s, "speedup": 1.0, "block_frac": 1.0,
                 "psnr_db": float("inf")})
    for method, ths in (("fbcache", a.fb_thresholds), ("teacache", a.tea_thresholds)):
        for th in ths:
            s0 = engine.engine_stats()
            with Timer() as t:
                imgs = run_engine(engine, conds, a.size, steps, seeds, cache={"method": method, "threshold": th})
            s1 = engine.engine_stats()
            frac = (s1["block_evals"] - s0["block_evals"]) / max(1, s1["block_evals_without_cache"]
                                                                 - s0["block_evals_without_cache"])
            rows.append({"method": method, "threshold": th, "seconds": t.s, "speedup": t0.s / t.s,
                         "block_frac": frac, "psnr_db": float(np.mean([psnr(x, y) for x, y in zip(imgs, base)]))})
    return rows


def bench_latency(engine, pipe, conds, a) -> dict:
    size, steps = a.latency_size, [a.latency_steps]
    run_engine(engine, conds[:1], size, [3], [0])
    run_pipeline(pipe, conds[:1], size, [3], [0])
    te, td = [], []
    for _ in range(a.latency_reps):
        with Timer() as t:
            run_engine(engine, conds[:1], size, steps, [0])
        te.append(t.s)
        with Timer() as t:
            run_pipeline(pipe, conds[:1], size, steps, [0])
        td.append(t.s)
    e, d = min(te), min(td)
    return {"size": size, "steps": a.latency_steps, "engine_s": e, "diffusers_s": d, "speedup": d / e}


def profile(engine, pipe, conds, a) -> None:
    """Where a batched step's time goes: per-step wall time and the top GPU kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    n, steps = a.num_requests, 4
    conds = [conds[i % len(conds)] for i in range(n)]
    run_engine(engine, conds, a.size, [2] * n, list(range(n)))
    params = [DiffusionParams(height=a.size, width=a.size, num_inference_steps=steps, guidance_scale=4.5, seed=i)
              for i in range(n)]
    reqs = [engine.make_request(None, p, None, c["prompt_embeds"][0], c["prompt_attention_mask"][0])
            for p, c in zip(params, conds)]
    for r in reqs:
        engine.add(r)
    engine.step()                                    # admission + first step
    with Timer() as t:
        engine.runner.step(engine.batcher.schedule())
    print(f"engine: one step of {n} requests ({2 * n} rows) at {a.size}px: {t.s * 1e3:.1f} ms")
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.runner.step(engine.batcher.schedule())
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    while engine.has_work():
        engine.step()
    with Timer() as t:
        run_pipeline(pipe, conds[:1], a.size, [steps], [0])
    print(f"diffusers: {steps} steps of 1 request at {a.size}px (+ VAE): {t.s * 1e3:.1f} ms")
    profile_vae(engine, a)
    profile_phases(engine, conds, a)


def profile_phases(engine, conds, a) -> None:
    """The throughput scenario with the engine's phases timed (synchronized: slower than a real run)."""
    import time
    from collections import defaultdict

    spent: dict = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kw):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            torch.cuda.synchronize()
            spent[name] += time.perf_counter() - t0
            return out
        return wrapper

    engine._admit = timed("admit", engine._admit)
    engine._finish = timed("finish+decode", engine._finish)
    runner = engine.runner
    runner._transformer = timed("transformer", runner._transformer)
    runner._scheduler_steps = timed("scheduler steps", runner._scheduler_steps)
    runner._inputs = timed("inputs", runner._inputs)
    rng = random.Random(0)
    steps = [rng.randint(a.min_steps, a.max_steps) for _ in range(a.num_requests)]
    conds = [conds[i % len(conds)] for i in range(a.num_requests)]
    with Timer() as t:
        run_engine(engine, conds, a.size, steps, list(range(a.num_requests)))
    print(f"phases of the throughput run ({t.s:.2f} s wall):", {k: round(v, 3) for k, v in spent.items()})


def profile_vae(engine, a) -> None:
    """VAE decode time per image at batch 1 and 8, NCHW vs channels_last, cudnn.benchmark off/on."""
    import copy

    fam = engine.family
    lat = torch.randn(8, fam.in_channels, a.size // 8, a.size // 8, device=engine.device, dtype=engine.dtype)
    vae_nchw = fam.vae
    vae_cl = copy.deepcopy(fam.vae).to(memory_format=torch.channels_last)
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for name, vae in (("nchw", vae_nchw), ("channels_last", vae_cl)):
            for b in (1, 8):
                x = lat[:b] / vae.config.scaling_factor
                if name == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    vae.decode(x)
                    with Timer() as t:
                        vae.decode(x)
                print(f"vae {name:13s} cudnn.benchmark={bench!s:5s} batch {b}: {t.s * 1e3 / b:.1f} ms/image")
    torch.backends.cudnn.benchmark = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="shape:pixart-sigma-xl")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's transformer blocks")
    ap.add_argument("--no-fuse", action="store_true", help="eager elementwise ops (no fused helper kernels)")
    ap.add_argument("--no-graphs", action="store_true", help="no CUDA graphs in the engine")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on tiny:pixart")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--min-steps", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--cache-requests", type=int, default=4)
    ap.add_argument("--cache-steps", type=int, default=20)
    ap.add_argument("--fb-thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--tea-thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.6])
    ap.add_argument("--latency-size", type=int, default=1024)
    ap.add_argument("--latency-steps", type=int, default=20)
    ap.add_argument("--latency-reps", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="profile one batched step and exit")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "cache", "latency"])
    a = ap.parse_args()
    if a.quick:
        a.shape, a.device, a.dtype = "tiny:pixart", "cpu", "float32"
        a.num_requests, a.size, a.min_steps, a.max_steps = 4, 32, 2, 4
        a.cache_requests, a.cache_steps, a.latency_size, a.latency_steps, a.latency_reps = 2, 6, 64, 4, 1
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --quick for a CPU smoke run")
    cfg = DiTEngineConfig(model=ModelConfig(path=a.shape, dtype=a.dtype), device=a.device,
                          max_batch_size=max(16, a.num_requests), compile=a.compile, max_pixels=2048 * 2048,
                          fuse_elementwise=not a.no_fuse, cuda_graphs=not a.no_graphs)
    engine = DiTEngine(cfg)
    pipe = make_pipeline(engine)
    conds = embed_prompts(pipe, PROMPTS)
    if a.profile:
        return profile(engine, pipe, conds, a)
    result: dict = {"shape": a.shape, "dtype": a.dtype, "compile": a.compile, "fuse_elementwise": not a.no_fuse,
                    "cuda_graphs": not a.no_graphs,
                    "note": "random weights: PSNR numbers do not predict a trained model's quality"}
    if "throughput" not in a.skip:
        result["throughput"] = bench_throughput(engine, pipe, conds, a)
        gc.collect()
    if "cache" not in a.skip:
        result["cache"] = bench_cache(engine, conds, a)
    if "latency" not in a.skip:
        result["latency"] = bench_latency(engine, pipe, conds, a)
    path = write_result(f"dit_{a.device}.json", result)

    print(f"\n## DiT engine vs diffusers ({a.shape}, {a.dtype}{', compiled' if a.compile else ''})\n")
    if "throughput" in result:
        r = result["throughput"]
        print(table([{"scenario": f"{r['requests']} requests @ {r['size']}px, steps {a.min_steps}-{a.max_steps}",
                      "engine img/s": r["engine_img_per_s"], "diffusers img/s": r["diffusers_img_per_s"],
                      "speedup": r["speedup"], "avg batch": r["avg_batch_images"],
                      "min PSNR vs diffusers": r["min_psnr_vs_diffusers"]}],
                    ["scenario", "engine img/s", "diffusers img/s", "speedup", "avg batch", "min PSNR vs diffusers"]))
        print()
    if "cache" in result:
        print(table(result["cache"], ["method", "threshold", "seconds", "speedup", "block_frac", "psnr_db"]))
        print("\n(random weights: the PSNR side of the caching curve says little about a trained model)\n")
    if "latency" in result:
        r = result["latency"]
        print(table([{"scenario": f"1 image @ {r['size']}px, {r['steps']} steps", "engine s": r["engine_s"],
                      "diffusers s": r["diffusers_s"], "speedup": r["speedup"]}],
                    ["scenario", "engine s", "diffusers s", "speedup"]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
