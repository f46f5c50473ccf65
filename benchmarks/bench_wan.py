"""Wan text-to-video on the DiT engine vs diffusers' WanPipeline, at the real Wan2.1 1.3B and 14B shapes
(480x832) and Wan2.2 TI2V-5B's (704x1280: its Wan2.2 VAE, expand_timesteps) with random bf16 weights built
directly on the GPU (transformer and VAE; nothing is written to disk).
The text encoder is out of the timing: both sides get the same random UMT5 states [512, 4096].

    python benchmarks/bench_wan.py                 # 1.3B and 14B, 480x832, 33 and 81 frames, 20 steps
    python benchmarks/bench_wan.py --quick         # 1.3B, 33 frames, 4 steps (< 5 minutes)
    python benchmarks/bench_wan.py --models 1.3b --frames 81
    python benchmarks/bench_wan.py --models 5b --frames 33 121    # Wan2.2 TI2V-5B at 704x1280
    python benchmarks/bench_wan.py --compile       # + torch.compile'd blocks in the engine

1. peak: a large bf16 torch.mm, the measured matmul roofline.
2. SDPA kernels (flash, cuDNN, memory-efficient) on each shape's self-attention [2, heads, N, 128]:
   the engine's ``attention_backend: auto`` picks the fastest the same way, per token count.
3. latency of one video (transformer + VAE, CFG 5.0 with a negative prompt's states), engine vs
   diffusers, same weights, same seed; PSNR of the engine's frames against diffusers'.
4. 4 videos at once (``--videos``): videos/hour (with the VAE) and the transformer's achieved TFLOP/s (denoising
   only) against the measured peak; FLOPs per row and block: self-attention projections 8 N D^2,
   attention 4 N^2 D, cross-attention 4 N D^2 + 4 L D^2 + 4 N L D (L = 512 text tokens), MLP
   4 N D F.
5. step caching (TeaCache with TeaCache4Wan2.1's 1.3B polynomial on the time embedding, first-block
   cache), 1.3B only: speedup and PSNR of the frames against uncached ones.
6. ``--sections profile`` (not in the default run): torch.profiler's top CUDA kernels over two steps of the
   ``--videos`` batch (where the rest of the peak goes).
Results: benchmarks/results/wan_cuda.json (``--quick``: wan_cuda_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, device_name, kernel_profile, matmul_peak, psnr, table, write_result  # noqa: E402
from omni_ray.config import DiTEngineConfig, ModelConfig  # noqa: E402
from omni_ray.dit import DiffusionParams, DiTEngine  # noqa: E402
from omni_ray.dit.families.sdpa_choice import time_backends  # noqa: E402
from omni_ray.testing.tiny_wan import (  # noqa: E402
    WAN21_T2V_1_3B,
    WAN21_T2V_14B,
    WAN22_TI2V_5B,
    WAN22_TI2V_FLOW_SHIFT,
    WAN22_VAE,
    WAN_SCHEDULER,
    WAN_VAE,
)


@dataclass(frozen=True)
class Shape:
    """A checkpoint's transformer and VAE configs, its default size and its pipeline settings."""

    cfg: dict
    vae: dict
    height: int
    width: int
    scheduler: dict
    expand_timesteps: bool = False      # Wan2.2 TI2V

    @property
    def scale(self) -> int:
        return self.vae["scale_factor_spatial"] if "scale_factor_spatial" in self.vae else 8


MODELS = {"1.3b": Shape(WAN21_T2V_1_3B, WAN_VAE, 480, 832, WAN_SCHEDULER),
          "14b": Shape(WAN21_T2V_14B, WAN_VAE, 480, 832, WAN_SCHEDULER),
          "5b": Shape(WAN22_TI2V_5B, WAN22_VAE, 704, 1280, WAN_SCHEDULER | {"flow_shift": WAN22_TI2V_FLOW_SHIFT},
                      expand_timesteps=True)}
GUIDANCE = 5.0
TEXT_LEN = 512
DEVICE = "cuda"


# ----------------------------------------------------------------------------- model in memory
def build_components(shape: Shape, device: str = DEVICE) -> dict:
    """Random weights in bf16 on the device, with the modules diffusers keeps in float32 (norms, time
    embedder, modulation tables, RoPE) in float32, as ``from_pretrained(torch_dtype=bf16)`` loads them."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)              # created in bf16: no fp32 copy of 14B parameters
    try:
        with torch.device(device):
            tr = WanTransformer3DModel(**shape.cfg)
            vae = AutoencoderKLWan(**shape.vae)
    finally:
        torch.set_default_dtype(prev)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, m in tr.named_modules():
        if any(k in name.split(".") for k in keep):
            m.float()
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    r = tr.rope
    tr.rope = WanRotaryPosEmbed(r.attention_head_dim, r.patch_size, r.max_seq_len).to(device)
    return {"transformer": tr.eval().requires_grad_(False), "vae": vae.eval().requires_grad_(False),
            "scheduler": UniPCMultistepScheduler(**shape.scheduler), "expand_timesteps": shape.expand_timesteps}


def make_pipeline(comps: dict, shape: Shape):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=comps["vae"], transformer=comps["transformer"],
                       scheduler=UniPCMultistepScheduler(**shape.scheduler), expand_timesteps=shape.expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_states(n: int, seed: int, dim: int) -> list[torch.Tensor]:
    """UMT5-like states: real tokens then the zero padding the pipeline's encode_prompt leaves."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(TEXT_LEN, dim, generator=g, device=DEVICE, dtype=torch.bfloat16)
        x[40 + 8 * i:] = 0
        out.append(x)
    return out


SECTIONS = ("sdpa", "latency", "diffusers", "concurrent", "cache", "profile")


# ----------------------------------------------------------------------------- runs
def run_engine(engine: DiTEngine, shape: Shape, pos: list, neg: list, frames: int, steps: int, seeds: list[int],
               cache=None, output_type: str = "np") -> list:
    params = [DiffusionParams(height=shape.height, width=shape.width, num_frames=frames, num_inference_steps=steps,
                              guidance_scale=GUIDANCE, seed=s, cache=cache) for s in seeds]
    return engine.generate(None, params, prompt_embeds=pos[:len(seeds)], negative_prompt_embeds=neg[:len(seeds)],
                           use_tqdm=False, output_type=output_type)


def run_pipeline(pipe, shape: Shape, pos: torch.Tensor, neg: torch.Tensor, frames: int, steps: int,
                 seed: int) -> np.ndarray:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    return pipe(prompt_embeds=pos[None], negative_prompt_embeds=neg[None], height=shape.height, width=shape.width,
                num_frames=frames, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=gen,
                output_type="np").frames[0]


def tokens(shape: Shape, frames: int) -> int:
    pt, ph, pw = shape.cfg["patch_size"]
    return ((frames - 1) // 4 + 1) // pt * (shape.height // shape.scale // ph) * (shape.width // shape.scale // pw)


def forward_flops(shape: Shape, frames: int, rows: int) -> float:
    cfg = shape.cfg
    d, f, n, L = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], tokens(shape, frames), TEXT_LEN
    block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * L * d * d + 4 * n * L * d + 4 * n * d * f
    return rows * cfg["num_layers"] * block


# ----------------------------------------------------------------------------- sections
def bench_sdpa(model: str, shape: Shape, frames_list: list[int]) -> list[dict]:
    rows, cfg = [], shape.cfg
    for frames in frames_list:
        n = tokens(shape, frames)
        ms = time_backends(2, cfg["num_attention_heads"], n, cfg["attention_head_dim"])
        flops = 4 * 2 * cfg["num_attention_heads"] * n * n * cfg["attention_head_dim"]
        best = min(ms, key=ms.get)
        rows.append({"model": model, "frames": frames, "tokens": n, **{f"{k}_ms": v for k, v in ms.items()},
                     **{f"{k}_tflops": flops / (v / 1e3) / 1e12 for k, v in ms.items()}, "fastest": best})
        print(f"SDPA {model} {frames} frames ({n} tokens): " + ", ".join(
            f"{k} {v:.2f} ms ({flops / (v / 1e3) / 1e12:.0f} TFLOP/s)" for k, v in ms.items()) + f" -> {best}",
            flush=True)
    return rows


def bench_latency(model, engine, pipe, shape, pos, neg, frames_list, steps) -> list[dict]:
    rows = []
    for frames in frames_list:
        run_engine(engine, shape, pos, neg, frames, 2, [0])           # warm up: SDPA choice, graph capture, VAE
        run_pipeline(pipe, shape, pos[0], neg[0], frames, 2, 0)
        with Timer() as te:
            ours = run_engine(engine, shape, pos, neg, frames, steps, [7])[0]
        with Timer() as td:
            ref = run_pipeline(pipe, shape, pos[0], neg[0], frames, steps, 7)
        rows.append({"model": model, "frames": frames, "steps": steps, "engine_s": te.s, "diffusers_s": td.s,
                     "ratio": te.s / td.s, "psnr_vs_diffusers": psnr(ours, ref)})
        print(f"latency {model} {frames} frames: engine {te.s:.2f} s, diffusers {td.s:.2f} s ({te.s / td.s:.2f}x), "
              f"PSNR {rows[-1]['psnr_vs_diffusers']:.1f} dB", flush=True)
    return rows


def bench_concurrent(model, engine, shape, pos, neg, frames_list, steps, peak, latency, n=4) -> list[dict]:
    rows = []
    for frames in frames_list:
        seeds = list(range(n))
        run_engine(engine, shape, pos, neg, frames, 2, seeds, output_type="latent")   # warm up: this batch's graphs
        with Timer() as t_lat:                        # denoising only: the transformer's FLOP rate
            run_engine(engine, shape, pos, neg, frames, steps, seeds, output_type="latent")
        with Timer() as t_vid:
            run_engine(engine, shape, pos, neg, frames, steps, seeds)
        flops = forward_flops(shape, frames, 2 * n) * steps
        single = next((r for r in latency if r["frames"] == frames), None)
        rows.append({"model": model, "frames": frames, "videos": n, "steps": steps, "seconds": t_vid.s,
                     "videos_per_hour": n / t_vid.s * 3600,
                     "diffusers_sequential_videos_per_hour": 3600 / single["diffusers_s"] if single else None,
                     "denoise_s": t_lat.s, "tflops": flops / t_lat.s / 1e12, "frac_of_peak": flops / t_lat.s / peak})
        print(f"{n} concurrent {model} {frames} frames: {rows[-1]['videos_per_hour']:.0f} videos/hour, "
              f"{rows[-1]['tflops']:.0f} TFLOP/s ({rows[-1]['frac_of_peak']:.0%} of peak)", flush=True)
    return rows


@torch.no_grad()
def bench_diffusers_transformer(model, pipe, shape, pos, neg, frames, peak) -> dict:
    """diffusers' transformer alone, the pipeline's two forwards (cond, uncond) of one step (TI2V: with the
    per-token timesteps [1, N] the pipeline passes)."""
    tr, cfg = pipe.transformer, shape.cfg
    x = torch.randn(1, cfg["in_channels"], (frames - 1) // 4 + 1, shape.height // shape.scale,
                    shape.width // shape.scale, device=DEVICE, dtype=torch.bfloat16)
    t = torch.full((1, tokens(shape, frames)) if shape.expand_timesteps else (1,), 500.0, device=DEVICE)
    for _ in range(2):
        tr(hidden_states=x, timestep=t, encoder_hidden_states=pos[0][None], return_dict=False)
    reps = 2
    with Timer() as tm:
        for _ in range(reps):
            tr(hidden_states=x, timestep=t, encoder_hidden_states=pos[0][None], return_dict=False)
            tr(hidden_states=x, timestep=t, encoder_hidden_states=neg[0][None], return_dict=False)
    flops = forward_flops(shape, frames, 2) * reps
    return {"model": model, "frames": frames, "step_ms": tm.s / reps * 1e3, "tflops": flops / tm.s / 1e12,
            "frac_of_peak": flops / tm.s / peak}


def bench_profile(engine, shape, pos, neg, frames, n=4) -> list[dict]:
    seeds = list(range(n))
    run_engine(engine, shape, pos, neg, frames, 2, seeds, output_type="latent")       # warm up: this batch's graphs
    rows = kernel_profile(lambda: run_engine(engine, shape, pos, neg, frames, 2, seeds, output_type="latent"))
    print(table(rows, ["kernel", "ms", "share", "calls"]), flush=True)
    return rows


def bench_cache(model, engine, shape, pos, neg, frames, steps, methods) -> list[dict]:
    with Timer() as t0:
        base = run_engine(engine, shape, pos, neg, frames, steps, [11])[0]
    rows = [{"model": model, "method": "off", "threshold": 0.0, "seconds": t0.s, "speedup": 1.0, "block_frac": 1.0,
             "psnr_db": float("inf")}]
    for method, th in methods:
        s0 = engine.engine_stats()
        with Timer() as t:
            vid = run_engine(engine, shape, pos, neg, frames, steps, [11], cache={"method": method, "threshold": th})[0]
        s1 = engine.engine_stats()
        frac = (s1["block_evals"] - s0["block_evals"]) / max(1, s1["block_evals_without_cache"]
                                                              - s0["block_evals_without_cache"])
        rows.append({"model": model, "method": method, "threshold": th, "seconds": t.s, "speedup": t0.s / t.s,
                     "block_frac": frac, "psnr_db": psnr(vid, base)})
        print(f"step cache {model} {method} {th}: {t0.s / t.s:.2f}x, PSNR {rows[-1]['psnr_db']:.1f} dB", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1.3B, 33 frames, 4 steps")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["1.3b", "14b"])
    ap.add_argument("--frames", nargs="+", type=int, default=[33, 81])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's transformer blocks")
    ap.add_argument("--no-lean-vae", action="store_true",
                    help="the engine decodes with diffusers' VAE modules (vae_lean_decoder: false); by default its "
                         "lean decoder, diffusers keeping its own copy of the VAE as loaded")
    ap.add_argument("--no-graphs", action="store_true", help="run the engine's blocks without CUDA graphs")
    ap.add_argument("--norm-kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="the blocks' norms as Triton kernels (norm_kernels; --no-norm-kernels: the compiled helpers)")
    ap.add_argument("--videos", type=int, default=4, help="videos at once in the concurrent section (default 4)")
    ap.add_argument("--concurrent-steps", type=int, default=None,
                    help="steps of the concurrent section's runs (default: --steps; its TFLOP/s does not depend on it)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=[x for x in SECTIONS if x != "profile"],
                    help="what to run (default: all; latency is what 'concurrent' compares with diffusers)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_wan needs a CUDA GPU")
    models, frames_list, steps = (["1.3b"], [33], 4) if a.quick else (a.models, a.frames, a.steps)

    peak = matmul_peak()
    print(f"bf16 matmul peak (8192^3 torch.mm): {peak / 1e12:.0f} TFLOP/s", flush=True)
    result: dict = {"device": device_name(), "dtype": "bfloat16", "compile": a.compile, "cuda_graphs": not a.no_graphs,
                    "norm_kernels": a.norm_kernels,
                    "steps": steps, "guidance_scale": GUIDANCE,
                    "size": {m: f"{MODELS[m].width}x{MODELS[m].height}" for m in models}, "frames": frames_list,
                    "peak_tflops": peak / 1e12, "sdpa": [], "latency": [], "concurrent": [],
                    "diffusers_transformer": [],
                    "step_cache": []}
    for model in models:
        shape = MODELS[model]
        cfg = shape.cfg
        if "sdpa" in a.sections:
            result["sdpa"] += bench_sdpa(model, shape, frames_list)
        with Timer() as tb:
            comps = build_components(shape)
        print(f"built Wan {model} transformer + VAE in memory: {tb.s:.1f} s, "
              f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
        ecfg = DiTEngineConfig(model=ModelConfig(path=f"shape:wan2.1-t2v-{model}", dtype="bfloat16"), device=DEVICE,
                               max_batch_size=max(4, a.videos), compile=a.compile, cuda_graphs=not a.no_graphs,
                               vae_lean_decoder=not a.no_lean_vae, norm_kernels=a.norm_kernels)
        ref_vae = copy.deepcopy(comps["vae"])        # diffusers' own, as loaded (the engine makes its decoder lean)
        engine = DiTEngine.from_components("WanPipeline", comps, ecfg)
        pipe = make_pipeline(comps | {"vae": ref_vae}, shape)
        pos, neg = (random_states(max(4, a.videos), s, cfg["text_dim"]) for s in (1, 2))
        lat = bench_latency(model, engine, pipe, shape, pos, neg, frames_list, steps) if "latency" in a.sections else []
        result["latency"] += lat
        if "diffusers" in a.sections:
            result["diffusers_transformer"] += [bench_diffusers_transformer(model, pipe, shape, pos, neg, f, peak)
                                                for f in frames_list]
        if "concurrent" in a.sections:
            result["concurrent"] += bench_concurrent(model, engine, shape, pos, neg, frames_list,
                                                     a.concurrent_steps or steps, peak, lat, n=a.videos)
        if "profile" in a.sections:                    # the batch's steps by kernel (2 steps, 1st frames)
            result.setdefault("profile", {})[model] = bench_profile(engine, shape, pos, neg, frames_list[0], a.videos)
        if model == "1.3b" and "cache" in a.sections:   # TeaCache4Wan2.1 suggests 0.05 - 0.08 for 1.3B
            methods = [("teacache", 0.08), ("fbcache", 0.1)] if a.quick else \
                [("teacache", 0.05), ("teacache", 0.08), ("teacache", 0.2), ("fbcache", 0.05), ("fbcache", 0.1)]
            result["step_cache"] += bench_cache(model, engine, shape, pos, neg, frames_list[0], steps, methods)
        result.setdefault("sdpa_picked", {})[model] = {str(k): v for k, v in engine.family.sdpa.picked.items()}
        result.setdefault("engine_stats", {})[model] = {k: v for k, v in engine.engine_stats().items()
                                                        if isinstance(v, (int, float))}
        del engine, pipe, comps
        gc.collect()
        torch.cuda.empty_cache()
        # the blocks' compiled helpers are one function per family: without a reset the next model's rows (another
        # width) recompile them with symbolic sizes, not the kernels it gets in a process of its own
        torch._dynamo.reset()

    sizes = ", ".join(f"{m} {MODELS[m].width}x{MODELS[m].height}" for m in models)
    print(f"\n## Wan T2V shapes, random bf16 weights, {device_name()}, {sizes}, {steps} steps, "
          f"CFG {GUIDANCE}{', compiled' if a.compile else ''}\n")
    print(table(result["sdpa"], ["model", "frames", "tokens", "flash_ms", "cudnn_ms", "efficient_ms", "fastest"]))
    print()
    print(table(result["latency"], ["model", "frames", "steps", "engine_s", "diffusers_s", "ratio",
                                    "psnr_vs_diffusers"]))
    print()
    print(table(result["concurrent"], ["model", "frames", "videos", "videos_per_hour",
                                       "diffusers_sequential_videos_per_hour", "tflops", "frac_of_peak"]))
    print()
    print(table(result["diffusers_transformer"], ["model", "frames", "step_ms", "tflops", "frac_of_peak"]))
    print()
    if result["step_cache"]:
        print(table(result["step_cache"], ["model", "method", "threshold", "seconds", "speedup", "block_frac",
                                           "psnr_db"]))
    name = "wan_cuda_quick.json" if a.quick else "wan_cuda.json"
    print(f"\npeak {peak / 1e12:.0f} TFLOP/s; wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
