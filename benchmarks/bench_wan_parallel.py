"""Wan2.1 text-to-video latency on one GPU vs CFG parallel, Ulysses sequence parallel and both.

    python benchmarks/bench_wan_parallel.py                     # 1.3B shape, 480x832, 33 frames, 20 steps
    python benchmarks/bench_wan_parallel.py --frames 81 --modes single cfg sp2 cfg+sp2 sp4   # 4 GPUs
    python benchmarks/bench_wan_parallel.py --model 14b --frames 81                          # 14B shape
    python benchmarks/bench_wan_parallel.py --device cpu --model tiny:wan2.1-t2v --height 32 --width 48 \\
        --frames 5 --steps 2 --reps 1                          # CPU smoke run (gloo)

Parallel engines load their model from a directory on every rank, so ``1.3b`` / ``14b`` write one once
(random bf16 weights in the real shape, no text encoder: the requests carry random UMT5-like states
[512, 4096] and a negative prompt's, CFG 5.0) under ``$OMNI_RAY_CACHE_DIR/bench-wan-<model>``. One
video at a time. Per mode: ``latency_s`` = the whole request through the VAE to frames, ``latent_s``
= the denoising loop only (``output_type="latent"``), the best of ``--reps``; ``ratio`` = mode /
single; PSNR of the frames against the single-GPU engine's (bf16 all-to-alls and all-gathers do not
change the math: expect >= 40 dB). Results: benchmarks/results/wan_parallel_<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import psnr, table, time_denoise_runs, write_result  # noqa: E402
from omni_ray.config import DiTEngineConfig, ModelConfig  # noqa: E402
from omni_ray.dit import DiffusionParams, DiTEngine  # noqa: E402

MODES = {"single": {}, "cfg": {"cfg_parallel": True}, "sp2": {"sequence_parallel_size": 2},
         "cfg+sp2": {"cfg_parallel": True, "sequence_parallel_size": 2}, "sp4": {"sequence_parallel_size": 4},
         "cfg+sp4": {"cfg_parallel": True, "sequence_parallel_size": 4}}
GUIDANCE = 5.0
TEXT_LEN = 512


def world(parallel: dict) -> int:
    return (2 if parallel.get("cfg_parallel") else 1) * parallel.get("sequence_parallel_size", 1)


def model_dir(name: str) -> str:
    """``1.3b`` / ``14b``: a WanPipeline directory of that shape (written once); anything else as it is."""
    if name not in ("1.3b", "14b"):
        return name
    from benchmarks.bench_wan import MODELS, build_components
    from omni_ray.testing import cache_root

    out = cache_root() / f"bench-wan-{name}"
    if (out / "model_index.json").exists():
        return str(out)
    comps = build_components(MODELS[name], "cuda")
    comps["transformer"].save_pretrained(out / "transformer", safe_serialization=True)
    comps["vae"].save_pretrained(out / "vae", safe_serialization=True)
    comps["scheduler"].save_pretrained(out / "scheduler")
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.36.0", "text_encoder": [None, None],
             "tokenizer": [None, None], "transformer": ["diffusers", "WanTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "boundary_ratio": None, "expand_timesteps": False}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    del comps
    torch.cuda.empty_cache()
    return str(out)


def make_engine(a, parallel: dict) -> DiTEngine:
    return DiTEngine(DiTEngineConfig(model=ModelConfig(path=a.path, dtype=a.dtype), device=a.device,
                                     max_pixels=a.height * a.width, max_frames=max(a.frames, 129),
                                     parallel=parallel, max_batch_size=2))


def states(engine: DiTEngine, seed: int) -> torch.Tensor:
    """UMT5-like states: 40 real tokens, then the zero padding the pipeline's encode_prompt leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TEXT_LEN, engine.family.caption_dim, generator=g)
    x[40:] = 0
    return x.to(engine.family.dtype)


def run(engine: DiTEngine, cond: dict, a, steps: int, output_type: str):
    p = DiffusionParams(height=a.height, width=a.width, num_frames=a.frames, num_inference_steps=steps,
                        guidance_scale=GUIDANCE, seed=0)
    return engine.generate(None, p, prompt_embeds=cond["pos"], negative_prompt_embeds=cond["neg"], use_tqdm=False,
                           output_type=output_type)[0]


def measure(engine: DiTEngine, cond: dict, a) -> dict:
    r = time_denoise_runs(lambda steps, out: run(engine, cond, a, steps, out), a.steps, a.reps)
    video = r.pop("output")
    return r | {"video": np.asarray(video, np.float64) / (255 if video.dtype == np.uint8 else 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1.3b", help="1.3b, 14b (random weights in that shape) or a Wan directory")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["single", "cfg", "sp2", "cfg+sp2"], choices=list(MODES))
    a = ap.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu --model tiny:wan2.1-t2v --height 32 --width 48 --frames 5 "
                 "--steps 2 for a smoke run")
    import ray

    a.path = model_dir(a.model)
    ray.init(include_dashboard=False, log_to_driver=False, **({"num_cpus": 4} if a.device == "cpu" else {}))
    devices = torch.cuda.device_count() if a.device == "cuda" else 4
    rows, base, cond = [], None, None
    for mode in ["single"] + [m for m in a.modes if m != "single"]:
        par = MODES[mode]
        if world(par) > devices:
            print(f"{mode}: needs {world(par)} devices, have {devices}; skipped")
            continue
        engine = make_engine(a, par)
        try:
            cond = cond or {"pos": states(engine, 0), "neg": states(engine, 1)}
            r = measure(engine, cond, a)
        finally:
            engine.shutdown()
            del engine
            gc.collect()
            if a.device == "cuda":
                torch.cuda.empty_cache()
        video = r.pop("video")
        base = base or r | {"video": video}
        r |= {"mode": mode, "ranks": world(par), "ratio": r["latency_s"] / base["latency_s"],
              "latent_ratio": r["latent_s"] / base["latent_s"], "psnr_vs_single_db": psnr(video, base["video"])}
        rows.append(r)
        print(f"{mode}: {r['latency_s']:.3f} s/video ({r['ratio']:.2f}x), denoising {r['latent_s']:.3f} s "
              f"({r['latent_ratio']:.2f}x), PSNR vs single {r['psnr_vs_single_db']:.1f} dB", flush=True)
    result = {"model": a.model, "dtype": a.dtype, "height": a.height, "width": a.width, "frames": a.frames,
              "steps": a.steps, "guidance": GUIDANCE, "reps": a.reps, "modes": rows}
    path = write_result(f"wan_parallel_{a.device}.json", result)
    print(f"\n## Parallel Wan, {a.model} @ {a.width}x{a.height}, {a.frames} frames, {a.steps} steps, CFG on "
          f"({a.dtype})\n")
    print(table(rows, ["mode", "ranks", "latency_s", "ratio", "latent_s", "latent_ratio", "step_ms",
                       "psnr_vs_single_db"]))
    print(f"\nwrote {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
