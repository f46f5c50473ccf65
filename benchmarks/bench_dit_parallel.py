"""Parallel DiT latency: one image on one GPU vs CFG parallel (2 GPUs) vs sequence parallel (2 GPUs).

    python benchmarks/bench_dit_parallel.py                       # GPU: shape:pixart-sigma-xl, 1024 px, 20 steps
    python benchmarks/bench_dit_parallel.py --modes single cfg sp2 cfg+sp2     # + 4 GPUs
    python benchmarks/bench_dit_parallel.py --device cpu --model tiny:pixart --size 64   # CPU smoke run

One request at a time (guidance 4.5, so the single engine runs a 2-row CFG batch), the same
precomputed caption embeddings as ``bench_dit.py`` (text encoder out of the timing). Per mode:
``latency_s`` = the whole request through the VAE to pixels, ``latent_s`` = the denoising loop only
(``output_type="latent"``); both the best of ``--reps``. ``ratio`` = mode / single (target for CFG
parallel: <= 0.6). Each parallel engine starts its Ray worker ranks, is measured, then shut down
(one worker group per process). Results: benchmarks/results/dit_parallel_<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_dit import PROMPTS, embed_prompts, make_pipeline, psnr  # noqa: E402
from benchmarks.common import table, time_denoise_runs, write_result  # noqa: E402
from omni_ray.config import DiTEngineConfig, ModelConfig  # noqa: E402
from omni_ray.dit import DiffusionParams, DiTEngine  # noqa: E402

MODES = {"single": {}, "cfg": {"cfg_parallel": True}, "sp2": {"sequence_parallel_size": 2},
         "cfg+sp2": {"cfg_parallel": True, "sequence_parallel_size": 2}, "sp4": {"sequence_parallel_size": 4}}


def world(parallel: dict) -> int:
    return (2 if parallel.get("cfg_parallel") else 1) * parallel.get("sequence_parallel_size", 1)


def make_engine(a, parallel: dict) -> DiTEngine:
    return DiTEngine(DiTEngineConfig(model=ModelConfig(path=a.model, dtype=a.dtype), device=a.device,
                                     max_pixels=max(1024 * 1024, a.size * a.size), parallel=parallel,
                                     max_batch_size=4))


def run(engine: DiTEngine, cond: dict, a, steps: int, output_type: str):
    p = DiffusionParams(height=a.size, width=a.size, num_inference_steps=steps, guidance_scale=a.guidance, seed=0)
    return engine.generate(None, p, prompt_embeds=cond["prompt_embeds"], prompt_mask=cond["prompt_attention_mask"],
                           use_tqdm=False, output_type=output_type)[0]


def measure(engine: DiTEngine, cond: dict, a) -> dict:
    r = time_denoise_runs(lambda steps, out: run(engine, cond, a, steps, out), a.steps, a.reps, warm_steps=3)
    return r | {"image": np.asarray(r.pop("output"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shape:pixart-sigma-xl")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["single", "cfg", "sp2"], choices=list(MODES))
    a = ap.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu --model tiny:pixart --size 64 for a smoke run")
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, **({"num_cpus": 4} if a.device == "cpu" else {}))
    devices = torch.cuda.device_count() if a.device == "cuda" else 4

    single = make_engine(a, {})
    pipe = make_pipeline(single)
    cond = {k: v[0].cpu() for k, v in embed_prompts(pipe, PROMPTS[:1])[0].items()}
    del pipe
    rows, base = [], None
    for mode in ["single"] + [m for m in a.modes if m != "single"]:
        par = MODES[mode]
        if world(par) > devices:
            print(f"{mode}: needs {world(par)} devices, have {devices}; skipped")
            continue
        engine = single if mode == "single" else make_engine(a, par)
        try:
            r = measure(engine, cond, a)
        finally:
            engine.shutdown()
            del engine
            single = None
            gc.collect()
            if a.device == "cuda":
                torch.cuda.empty_cache()
        image = r.pop("image")
        base = base or r | {"image": image}
        r |= {"mode": mode, "ranks": world(par), "ratio": r["latency_s"] / base["latency_s"],
              "latent_ratio": r["latent_s"] / base["latent_s"],
              "max_abs_diff_vs_single": float(np.abs(image.astype(np.float64) - base["image"]).max()),
              "psnr_vs_single_db": psnr(image, base["image"])}
        rows.append(r)
        print(f"{mode}: {r['latency_s']:.3f} s/image ({r['ratio']:.2f}x), denoising {r['latent_s']:.3f} s "
              f"({r['latent_ratio']:.2f}x)", flush=True)
    result = {"model": a.model, "dtype": a.dtype, "size": a.size, "steps": a.steps, "guidance": a.guidance,
              "reps": a.reps, "target": "cfg ratio <= 0.6", "modes": rows}
    path = write_result(f"dit_parallel_{a.device}.json", result)
    print(f"\n## Parallel DiT, {a.model} @ {a.size} px, {a.steps} steps, CFG on ({a.dtype})\n")
    print(table(rows, ["mode", "ranks", "latency_s", "ratio", "latent_s", "latent_ratio", "step_ms",
                       "psnr_vs_single_db"]))
    print(f"\nwrote {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
