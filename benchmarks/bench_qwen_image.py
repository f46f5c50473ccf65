"""Qwen-Image on the DiT engine vs diffusers' QwenImagePipeline, at the real shape with random bf16
weights built directly on the GPU (the 20B transformer and the VAE; nothing is written to disk), the
text encoder out of the timing: both sides get the same random prompt embeds [T, 3584].

    python benchmarks/bench_qwen_image.py            # 512 and 1024 px, 20 steps
    python benchmarks/bench_qwen_image.py --quick    # 512 px only, 8 steps (< 5 minutes)
    python benchmarks/bench_qwen_image.py --compile  # + torch.compile'd blocks in the engine
    python benchmarks/bench_qwen_image.py --quick --profile   # + the 8-concurrent steps' top CUDA kernels
    python benchmarks/bench_qwen_image.py --sizes 1024 --sections concurrent   # one part, one size

1. peak: a large bf16 torch.mm, the measured matmul roofline.
2. latency: one image (+ VAE), with and without a negative prompt (true CFG), engine vs diffusers;
   diffusers runs CFG as two forwards in a row, the engine as one doubled batch.
3. concurrency: 8 requests at once (images/s) and the transformer's achieved TFLOP/s, FLOPs counted per
   stream (image tokens x image-stream weights, text tokens x text-stream weights, the modulation, plus
   attention 4 * S^2 * D per block and row), against the measured peak; diffusers' transformer given a
   static batch of 8 (one forward) for comparison.
4. step caching: TeaCache / first-block cache speedup and PSNR against the uncached image.
Results: benchmarks/results/qwen_image_cuda.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, device_name, kernel_profile, matmul_peak, psnr, table, write_result  # noqa: E402
from omni_ray.config import DiTEngineConfig, ModelConfig  # noqa: E402
from omni_ray.dit import DiffusionParams, DiTEngine  # noqa: E402
from omni_ray.testing.tiny_qwen_image import QWEN_IMAGE_SCHEDULER, QWEN_IMAGE_TRANSFORMER, QWEN_IMAGE_VAE  # noqa: E402

TRUE_CFG = 4.0
SECTIONS = ("latency", "concurrent", "static", "cache")     # static: diffusers' transformer on a static batch


# ----------------------------------------------------------------------------- model in memory
def build_components(device: str, dtype: torch.dtype) -> dict:
    """The real shapes with random weights, created in ``dtype`` on the device (no fp32 copy, no disk)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            tr = QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER).eval().requires_grad_(False)
            vae = AutoencoderKLQwenImage(**QWEN_IMAGE_VAE).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(prev)
    return {"transformer": tr, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)}


def make_pipeline(comps: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=comps["vae"],
                             text_encoder=None, tokenizer=None, transformer=comps["transformer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(n: int, dim: int, device, dtype, lengths=(100, 92, 108, 96, 104, 88, 112, 100)) -> list:
    g = torch.Generator(device).manual_seed(1)
    return [torch.randn(lengths[i % len(lengths)], dim, generator=g, device=device, dtype=dtype) for i in range(n)]


# ----------------------------------------------------------------------------- runs
def run_engine(engine: DiTEngine, pos: list, neg: list | None, size: int, steps: int, seeds: list[int],
               cache=None, output_type: str = "np") -> list:
    params = [DiffusionParams(height=size, width=size, num_inference_steps=steps, guidance_scale=TRUE_CFG, seed=s,
                              cache=cache) for s in seeds]
    return engine.generate(None, params, prompt_embeds=pos, negative_prompt_embeds=neg, use_tqdm=False,
                           output_type=output_type)


def run_pipeline(pipe, pos: torch.Tensor, neg: torch.Tensor | None, size: int, steps: int, seed: int):
    gen = torch.Generator(pipe.transformer.device).manual_seed(seed)
    kw = {} if neg is None else {"negative_prompt_embeds": neg[None]}
    return pipe(prompt_embeds=pos[None], height=size, width=size, num_inference_steps=steps, true_cfg_scale=TRUE_CFG,
                generator=gen, output_type="np", **kw).images[0]


# ----------------------------------------------------------------------------- FLOPs and peak
def forward_flops(cfg: dict, size: int, text_lens: list[int]) -> float:
    """One transformer forward over rows with the given caption lengths (real tokens only)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n_img = (size // 16) ** 2
    stream = 2 * 12 * d * d                        # q, k, v, out (4 d^2) + MLP d -> 4d -> d (8 d^2), x2 FLOPs
    per_block = 0.0
    for t in text_lens:
        per_block += n_img * stream + t * stream + 2 * 2 * 6 * d * d      # + img_mod / txt_mod (per row)
        per_block += 4 * (n_img + t) ** 2 * d                              # QK^T and PV
    edges = sum(2 * n_img * (cfg["in_channels"] * d + d * 4 * cfg["out_channels"]) for _ in text_lens)
    return per_block * cfg["num_layers"] + edges


# ----------------------------------------------------------------------------- sections
def bench_latency(engine, pipe, pos, neg, sizes, steps) -> list[dict]:
    rows = []
    for size in sizes:
        for negative in (False, True):
            n = neg[0] if negative else None
            run_engine(engine, [pos[0]], [n] if negative else None, size, 2, [0])     # warm up (graph capture)
            run_pipeline(pipe, pos[0], n, size, 2, 0)
            with Timer() as te:
                ours = run_engine(engine, [pos[0]], [n] if negative else None, size, steps, [7])[0]
            with Timer() as td:
                ref = run_pipeline(pipe, pos[0], n, size, steps, 7)
            rows.append({"size": size, "negative": negative, "steps": steps, "engine_s": te.s, "diffusers_s": td.s,
                         "ratio": te.s / td.s, "psnr_vs_diffusers": psnr(ours, ref)})
            print(f"latency {size}px negative={negative}: engine {te.s:.2f} s, diffusers {td.s:.2f} s "
                  f"({te.s / td.s:.2f}x)", flush=True)
    return rows


def bench_concurrent(engine, pos, neg, cfg, size, steps, peak, n=8, profile=False) -> list[dict]:
    rows = []
    for negative in (True, False):
        negs = neg[:n] if negative else None
        run_engine(engine, pos[:n], negs, size, 2, list(range(n)), output_type="latent")   # warm up
        with Timer() as t_lat:                         # transformer + schedulers only (no VAE): the FLOP rate
            run_engine(engine, pos[:n], negs, size, steps, list(range(n)), output_type="latent")
        with Timer() as t_img:
            run_engine(engine, pos[:n], negs, size, steps, list(range(n)))
        lens = [p.shape[0] for p in pos[:n]] + ([x.shape[0] for x in negs] if negative else [])
        flops = forward_flops(cfg, size, lens) * steps
        kernels = None
        if profile:                                    # where two of these steps' device time goes, by kernel
            kernels = kernel_profile(lambda: run_engine(engine, pos[:n], negs, size, 2, list(range(n)),
                                                        output_type="latent"))
            print(table(kernels, ["kernel", "ms", "share", "calls"]), flush=True)
        rows.append({"size": size, "requests": n, "negative": negative, "steps": steps, "seconds": t_img.s,
                     "images_per_s": n / t_img.s, "denoise_s": t_lat.s, "tflops": flops / t_lat.s / 1e12,
                     "frac_of_peak": flops / t_lat.s / peak} | ({"kernels": kernels} if kernels else {}))
        print(f"{n} concurrent {size}px negative={negative}: {n / t_img.s:.2f} img/s, "
              f"{flops / t_lat.s / 1e12:.0f} TFLOP/s ({flops / t_lat.s / peak:.0%} of peak)", flush=True)
    return rows


@torch.no_grad()
def bench_diffusers_static(pipe, pos, cfg, size, peak, n=8) -> dict:
    """diffusers' transformer alone, one forward over a static batch of n (equal caption lengths)."""
    tr = pipe.transformer
    t = min(p.shape[0] for p in pos[:n])                 # equal lengths: no mask, as a static batch has none
    x = torch.randn(n, (size // 16) ** 2, 64, device=tr.device, dtype=tr.dtype)
    ctx = torch.stack([p[:t] for p in pos[:n]])
    ts = torch.full((n,), 0.5, device=tr.device, dtype=tr.dtype)
    shapes = [[(1, size // 16, size // 16)]] * n
    for _ in range(2):
        tr(hidden_states=x, encoder_hidden_states=ctx, timestep=ts, img_shapes=shapes, return_dict=False)
    reps = 3
    with Timer() as tm:
        for _ in range(reps):
            tr(hidden_states=x, encoder_hidden_states=ctx, timestep=ts, img_shapes=shapes, return_dict=False)
    flops = forward_flops(cfg, size, [t] * n) * reps
    return {"size": size, "batch": n, "forward_ms": tm.s / reps * 1e3, "tflops": flops / tm.s / 1e12,
            "frac_of_peak": flops / tm.s / peak}


def bench_cache(engine, pos, neg, size, steps, methods) -> list[dict]:
    for cache in [None] + [{"method": m, "threshold": th} for m, th in methods]:
        run_engine(engine, pos[:1], neg[:1], size, 3, [0], cache=cache)              # warm up
    with Timer() as t0:
        base = run_engine(engine, pos[:1], neg[:1], size, steps, [11])[0]
    rows = [{"method": "off", "threshold": 0.0, "seconds": t0.s, "speedup": 1.0, "block_frac": 1.0,
             "psnr_db": float("inf")}]
    for method, th in methods:
        s0 = engine.engine_stats()
        with Timer() as t:
            img = run_engine(engine, pos[:1], neg[:1], size, steps, [11], cache={"method": method, "threshold": th})[0]
        s1 = engine.engine_stats()
        frac = (s1["block_evals"] - s0["block_evals"]) / max(1, s1["block_evals_without_cache"]
                                                              - s0["block_evals_without_cache"])
        rows.append({"method": method, "threshold": th, "seconds": t.s, "speedup": t0.s / t.s, "block_frac": frac,
                     "psnr_db": psnr(img, base)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="512 px only, 8 steps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's transformer blocks")
    ap.add_argument("--no-graphs", action="store_true", help="run the engine's blocks without CUDA graphs")
    ap.add_argument("--profile", action="store_true", help="print where 8 concurrent requests' steps go, by kernel")
    ap.add_argument("--attention-backend", default="auto", help="the engine's attention_backend (auto: measured, "
                    "'split' among the candidates under a caption mask; cudnn: the single masked call)")
    ap.add_argument("--norm-kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="the blocks' layer norm + modulation as a Triton kernel (norm_kernels; --no-norm-kernels: "
                         "the compiled helper)")
    ap.add_argument("--caption-packing", action=argparse.BooleanOptionalAction, default=True,
                    help="the caption stream's GEMMs over real caption tokens only (caption_packing; "
                         "--no-caption-packing: every padded caption row)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 512 1024; quick: 512)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="parts to run (default all)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_qwen_image needs a CUDA GPU (the real Qwen-Image shape is 20B parameters)")
    torch.backends.cuda.matmul.allow_tf32 = True
    steps = 8 if a.quick else a.steps
    sizes = a.sizes or ([512] if a.quick else [512, 1024])
    on = set(a.sections)
    dtype = torch.bfloat16

    peak = matmul_peak()
    print(f"bf16 matmul peak (8192^3 torch.mm): {peak / 1e12:.0f} TFLOP/s", flush=True)
    with Timer() as tb:
        comps = build_components("cuda", dtype)
    print(f"built the 20B transformer + VAE in memory: {tb.s:.1f} s, "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    cfg = DiTEngineConfig(model=ModelConfig(path="shape:qwen-image", dtype="bfloat16"), device="cuda",
                          max_batch_size=16, compile=a.compile, cuda_graphs=not a.no_graphs, max_pixels=1024 * 1024,
                          attention_backend=a.attention_backend, caption_packing=a.caption_packing,
                          norm_kernels=a.norm_kernels)
    engine = DiTEngine.from_components("QwenImagePipeline", comps, cfg)
    pipe = make_pipeline(comps) if on & {"latency", "static"} else None
    tcfg = dict(comps["transformer"].config)
    pos = random_embeds(8, tcfg["joint_attention_dim"], "cuda", dtype)
    neg = random_embeds(8, tcfg["joint_attention_dim"], "cuda", dtype, lengths=(12, 14, 10, 16, 12, 18, 11, 13))

    result: dict = {"device": device_name(), "dtype": "bfloat16", "compile": a.compile, "cuda_graphs": not a.no_graphs,
                    "quick": a.quick, "steps": steps, "true_cfg_scale": TRUE_CFG, "peak_tflops": peak / 1e12,
                    "prompt_tokens": [p.shape[0] for p in pos], "negative_tokens": [x.shape[0] for x in neg]}
    result["latency"] = bench_latency(engine, pipe, pos, neg, sizes, steps) if "latency" in on else []
    result["concurrent"] = [r for s in sizes for r in bench_concurrent(engine, pos, neg, tcfg, s, steps, peak,
                                                                           profile=a.profile)] \
        if "concurrent" in on else []
    result["diffusers_static_batch"] = [bench_diffusers_static(pipe, pos, tcfg, s, peak) for s in sizes] \
        if "static" in on else []
    methods = [("teacache", 0.4), ("fbcache", 0.08)] if a.quick else \
        [("teacache", 0.2), ("teacache", 0.4), ("teacache", 0.8), ("fbcache", 0.05), ("fbcache", 0.1)]
    result["step_cache"] = bench_cache(engine, pos, neg, 512, steps, methods) if "cache" in on else []
    result["engine_stats"] = {k: v for k, v in engine.engine_stats().items() if isinstance(v, (int, float))}
    result["attention_backend"] = a.attention_backend
    result["caption_packing"], result["norm_kernels"] = a.caption_packing, a.norm_kernels
    result["sdpa_timings_ms"] = [{"tokens": n, "masked": m, "picked": engine.family.sdpa.picked[(n, m)], **ms}
                                 for (n, m), ms in engine.family.sdpa.timings.items()]

    print(f"\n## Qwen-Image shape, random bf16 weights, {device_name()}, {steps} steps, "
          f"true_cfg_scale {TRUE_CFG}{', compiled' if a.compile else ''}\n")
    print(table(result["latency"], ["size", "negative", "steps", "engine_s", "diffusers_s", "ratio",
                                    "psnr_vs_diffusers"]))
    print()
    static = [{"size": r["size"], "requests": f"diffusers static batch {r['batch']}", "tflops": r["tflops"],
               "frac_of_peak": r["frac_of_peak"]} for r in result["diffusers_static_batch"]]
    print(table(result["concurrent"] + static, ["size", "requests", "negative", "images_per_s", "tflops",
                                                "frac_of_peak"]))
    print()
    print(table(result["sdpa_timings_ms"], ["tokens", "masked", "picked", "flash", "cudnn", "efficient", "split"]))
    print()
    print(table(result["step_cache"], ["method", "threshold", "seconds", "speedup", "block_frac", "psnr_db"]))
    print(f"\npeak {peak / 1e12:.0f} TFLOP/s; wrote {write_result('qwen_image_cuda.json', result)}")


if __name__ == "__main__":
    main()
