"""Qwen-Image served as its two stages (the Qwen2.5-VL text encoder on the AR engine, the MMDiT +
VAE on the DiT engine, hidden states handed over) against diffusers' ``QwenImagePipeline``.

    python benchmarks/bench_qwen_image_serve.py            # GPU: shape:qwen-image (random bf16 weights)
    python benchmarks/bench_qwen_image_serve.py --quick    # CPU smoke run: tiny:qwen-image, 64 px, 2 steps

Both stages on one GPU through ``OmniLLM`` (the runner the Serve app uses; the Serve hop is
bench_serve.py's subject), 20 steps, 512x512 and 1024x1024, with and without a negative prompt
(true CFG: the negative encoded beside the prompt, both halves in one DiT batch):
- one request's latency (median of --repeats, the text encoder's and the DiT's share from the
  stage timings) against diffusers' pipeline in the same run (its own text encoder, two
  transformer passes per step under true CFG);
- requests/s at 1 and 8 concurrent (all submitted together; vLLM-Omni publishes 0.41 -> 0.82 req/s
  at concurrency 1 -> 8, 512x512, one H100).
Ours runs first, then its engines are shut down and diffusers' pipeline is loaded (both fit one
H100 in turn, not together). Step caching off throughout.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name, sync, table, write_result  # noqa: E402

PROMPT = "a lighthouse on a cliff above a stormy sea at night, oil painting, dramatic light"
NEGATIVE = "blurry, low quality, distorted"


def config(model: str, device: str, quick: bool) -> dict:
    ar = {"model": {"path": model}, "device": device,
          "cache": {"block_size": 16 if quick else 256, "num_blocks": 64 if quick else 32},   # prompts only
          "scheduler": {"max_num_batched_tokens": 8192, "max_num_seqs": 32, "max_model_len": 1024 if quick else 2048}}
    if quick:
        ar["enforce_eager"] = True
    dit = {"model": {"path": model}, "device": device, "max_batch_size": 8, "max_pixels": 1024 * 1024}
    return {"stages": {"encoder": {"kind": "ar", "engine": ar}, "denoiser": {"kind": "dit", "engine": dit}},
            "pipelines": {"qwen-image": {"graph": {"model": "denoiser", "stages": {"text_encoder": "encoder"}}}}}


def args_for(size: int, steps: int, negative: bool, seed: int) -> dict:
    kw = {"size": f"{size}x{size}", "num_inference_steps": steps, "seed": seed, "guidance_scale": 4.0}
    return kw | ({"negative_prompt": NEGATIVE} if negative else {})


def ours(model: str, device: str, sizes: list[int], steps: int, repeats: int, concurrency: list[int],
         quick: bool) -> list[dict]:
    from omni_ray import OmniLLM

    rows = []
    with OmniLLM(config(model, device, quick)) as omni:
        for size in sizes:       # warm-up: every batch shape measured below (graphs, compiles, the template's prefix)
            for neg in (False, True):
                for c in sorted({1, *concurrency}):
                    omni.generate("qwen-image", [f"{PROMPT} {i}" for i in range(c)], use_tqdm=False,
                                  **args_for(size, steps, neg, 0))
        for size in sizes:
            for neg in (False, True):
                lat, enc, den = [], [], []
                for r in range(repeats):
                    sync()
                    t0 = time.perf_counter()
                    out = omni.generate("qwen-image", PROMPT, use_tqdm=False, **args_for(size, steps, neg, 1 + r))
                    sync()
                    lat.append(time.perf_counter() - t0)
                    enc.append(out.stages[0]["elapsed_s"])
                    den.append(out.stages[1]["elapsed_s"])
                row = {"impl": "omni-ray", "size": size, "negative": neg, "latency_s": statistics.median(lat),
                       "encoder_s": statistics.median(enc), "dit_s": statistics.median(den)}
                for c in concurrency:
                    sync()
                    t0 = time.perf_counter()
                    omni.generate("qwen-image", [f"{PROMPT} {i}" for i in range(c)], use_tqdm=False,
                                  **args_for(size, steps, neg, 100))
                    sync()
                    row[f"req_per_s_c{c}"] = c / (time.perf_counter() - t0)
                rows.append(row)
                print(row, flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def diffusers_rows(model: str, device: str, sizes: list[int], steps: int, repeats: int, quick: bool) -> list[dict]:
    import diffusers

    from omni_ray.testing import resolve_model

    dtype = torch.float32 if quick or device == "cpu" else torch.bfloat16
    pipe = diffusers.QwenImagePipeline.from_pretrained(str(resolve_model(model)), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for size in sizes:
        for neg in (False, True):
            kw = {"negative_prompt": NEGATIVE} if neg else {}
            call = dict(height=size, width=size, num_inference_steps=steps, true_cfg_scale=4.0, **kw)
            pipe(PROMPT, generator=torch.Generator(device).manual_seed(0), **call)        # warm-up
            lat = []
            for r in range(repeats):
                sync()
                t0 = time.perf_counter()
                pipe(PROMPT, generator=torch.Generator(device).manual_seed(1 + r), **call)
                sync()
                lat.append(time.perf_counter() - t0)
            rows.append({"impl": "diffusers", "size": size, "negative": neg, "latency_s": statistics.median(lat),
                         "req_per_s_c1": 1 / statistics.median(lat)})
            print(rows[-1], flush=True)
    del pipe
    gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on tiny:qwen-image")
    ap.add_argument("--model", default=None, help="a Qwen-Image diffusers directory or shape:/tiny: name")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-diffusers", action="store_true")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    model = a.model or ("tiny:qwen-image" if a.quick else "shape:qwen-image")
    sizes = a.sizes or ([64] if a.quick else [512, 1024])
    steps = a.steps or (2 if a.quick else 20)
    repeats = 1 if a.quick else a.repeats
    conc = [1, 2] if a.quick else a.concurrency
    rows = ours(model, device, sizes, steps, repeats, conc, a.quick)
    if not a.skip_diffusers:
        rows += diffusers_rows(model, device, sizes, steps, repeats, a.quick)
        for r in rows:
            if r["impl"] == "omni-ray":
                ref = next(d for d in rows if d["impl"] == "diffusers" and (d["size"], d["negative"]) ==
                           (r["size"], r["negative"]))
                r["vs_diffusers"] = r["latency_s"] / ref["latency_s"]
    cols = ["impl", "size", "negative", "latency_s", "encoder_s", "dit_s", "vs_diffusers"] + \
        [f"req_per_s_c{c}" for c in conc]
    print(table(rows, cols))
    name = "qwen_image_serve_cpu_quick.json" if a.quick else f"qwen_image_serve_{device}.json"
    path = write_result(name, {"model": model, "steps": steps, "sizes": sizes, "device_name": device_name(),
                               "vllm_omni_reference": "0.41 -> 0.82 req/s at concurrency 1 -> 8, 512x512, one H100",
                               "rows": rows})
    print("wrote", path)


if __name__ == "__main__":
    main()
