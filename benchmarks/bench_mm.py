"""Image chats on the AR engine against the same prompts as text, and against transformers.

    python benchmarks/bench_mm.py                 # GPU: shape:qwen2.5-vl-7b (random bf16 weights)
    python benchmarks/bench_mm.py --quick         # CPU smoke run: tiny:qwen2.5-vl

R requests, each one W x W image and a ~64-token question, N output tokens (greedy, no EOS):
- engine: AsyncLLM with R concurrent callers (the serving engine), output tok/s and TTFT p50/p95;
  once with the images, once with text-only prompts of the same token length (the placeholders
  replaced by ordinary tokens) — the goal is image chats at >= 70% of text-only throughput;
- preprocessing ms per image (the checkpoint's image processor, done by the stage off the engine
  loop) and vision-encoder ms per image (alone and batched);
- transformers: ``Qwen2_5_VLForConditionalGeneration.generate`` on the same batch (left padding,
  sdpa), output tok/s and its time to the first token (a max_new_tokens=1 run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_serve import ms, pct  # noqa: E402
from benchmarks.common import write_result  # noqa: E402


def images(n: int, size: int) -> list[Image.Image]:
    rs = np.random.RandomState(0)
    return [Image.fromarray(rs.randint(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def questions(n: int, words: int) -> list[str]:
    rs = np.random.RandomState(1)
    vocab = "the a of image color shape light dark left right top bottom small large object scene".split()
    return [" ".join(rs.choice(vocab, words)) + "?" for _ in range(n)]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


async def serve_round(engine, prompts, max_tokens: int, tag: str) -> dict:
    from omni_ray.ar import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i, p):
        first, n = None, 0
        async for out in engine.generate(p, params, f"{tag}-{i}"):
            first = first or time.perf_counter()
            n += len(out.token_ids)
        return n, first

    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    dt = time.perf_counter() - t0
    ttft = [f - t0 for _, f in res]
    return {"tok_per_s": round(sum(n for n, _ in res) / dt, 1), "seconds": round(dt, 3),
            "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p95_ms": ms(pct(ttft, 95))}


def encoder_ms(llm_engine, items) -> dict:
    enc = llm_engine.runner.encoders
    one = [items[0]]
    enc._encode(one)
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        enc._encode(one)
    sync()
    alone = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    enc._encode(items)
    sync()
    batched = (time.perf_counter() - t0) / len(items)
    return {"encoder_ms_per_image_alone": ms(alone), "encoder_ms_per_image_batched": ms(batched)}


def hf_generate(path, mm_inputs, pad_id: int, max_tokens: int) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                               attn_implementation="sdpa").cuda().eval()
    width = max(len(m.token_ids) for m in mm_inputs)
    ids = torch.full((len(mm_inputs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, m in enumerate(mm_inputs):                  # left padding
        ids[i, width - len(m.token_ids):] = torch.tensor(m.token_ids)
        mask[i, width - len(m.token_ids):] = 1
    pixels = torch.cat([it.inputs["pixel_values"] for m in mm_inputs for it in m.items]).cuda().to(torch.bfloat16)
    grid = torch.cat([it.inputs["image_grid_thw"] for m in mm_inputs for it in m.items]).cuda()
    kw = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), pixel_values=pixels, image_grid_thw=grid,
              do_sample=False, pad_token_id=pad_id)
    out = {}
    with torch.inference_mode():
        model.generate(**kw, max_new_tokens=2, min_new_tokens=2)                 # warm up
        for name, n in (("ttft", 1), ("full", max_tokens)):
            sync()
            t0 = time.perf_counter()
            model.generate(**kw, max_new_tokens=n, min_new_tokens=n)
            sync()
            out[name] = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"hf_tok_per_s": round(len(mm_inputs) * max_tokens / out["full"], 1), "hf_ttft_ms": ms(out["ttft"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args()
    from omni_ray.ar import AsyncLLM
    from omni_ray.config import AREngineConfig
    from omni_ray.testing import resolve_model

    gpu = not a.quick
    model = "shape:qwen2.5-vl-7b" if gpu else "tiny:qwen2.5-vl"
    n_req, n_tok = a.requests or (64 if gpu else 8), a.tokens or (128 if gpu else 8)
    path = resolve_model(model)
    cfg = AREngineConfig.model_validate({
        "model": {"path": str(path)}, "device": "cuda" if gpu else "cpu", "enforce_eager": not gpu,
        "core_process": "off",
        "cache": {"block_size": 256 if gpu else 16, "num_blocks": -1 if gpu else 2048, "gpu_memory_utilization": 0.85,
                  "enable_prefix_caching": False},                 # every round computes every prompt
        "scheduler": {"max_num_seqs": 128, "max_model_len": 4096, "max_num_batched_tokens": 8192}})
    from omni_ray.ar.multimodal import MultiModalProcessor

    proc = MultiModalProcessor.from_pretrained(path)
    imgs, qs = images(n_req, a.image), questions(n_req, 48)
    tmpl = lambda q: proc.tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        tokenize=False, add_generation_prompt=True)
    t0 = time.perf_counter()
    mm = [proc(tmpl(q), images=[im]) for q, im in zip(qs, imgs)]
    pre_ms = ms((time.perf_counter() - t0) / n_req)
    rs = np.random.RandomState(2)
    vocab = proc.tokenizer.vocab_size
    text = []                                            # the same length, placeholders -> ordinary tokens
    for m in mm:
        ids = list(m.token_ids)
        for it in m.items:
            ids[it.offset:it.end] = rs.randint(1000, min(vocab, 100000), it.length).tolist()
        text.append(ids)
    result = {"model": model, "requests": n_req, "image": a.image, "output_tokens": n_tok,
              "prompt_tokens": int(np.mean([len(m.token_ids) for m in mm])),
              "image_tokens": mm[0].items[0].length, "preprocess_ms_per_image": pre_ms}
    print(f"{model}: {n_req} requests x ({result['prompt_tokens']} prompt tokens, {result['image_tokens']} of "
          f"them image) -> {n_tok} tokens; preprocessing {pre_ms} ms/image", flush=True)
    if gpu and not a.no_hf:                              # first: the engine then takes the free memory
        result |= hf_generate(path, mm, proc.tokenizer.pad_token_id or 0, n_tok)
        print(f"transformers: {result['hf_tok_per_s']} tok/s, TTFT {result['hf_ttft_ms']} ms", flush=True)
    engine = AsyncLLM(cfg)
    result |= encoder_ms(engine.engine, [m.items[0] for m in mm])
    encoders = engine.engine.runner.encoders

    async def run():
        await serve_round(engine, text[:4], 4, "warm-text")
        await serve_round(engine, mm[:4], 4, "warm-mm")
        out = {}
        for name, ps in (("text", text), ("image", mm), ("text_again", text), ("image_again", mm)):
            encoders.cache.entries.clear()                 # every round encodes its images
            encoders.cache.rows = 0
            out[name] = await serve_round(engine, ps, n_tok, name)
            print(f"  {name}: {out[name]}", flush=True)
        await engine.shutdown()
        return out

    rounds = asyncio.run(run())
    result["engine"] = rounds
    best = lambda k: max(rounds[k]["tok_per_s"], rounds[k + "_again"]["tok_per_s"])  # noqa: E731
    result["image_vs_text"] = round(best("image") / best("text"), 3)
    print(f"image chats at {result['image_vs_text']:.0%} of text-only throughput", flush=True)
    if "hf_tok_per_s" in result:
        result["engine_vs_hf"] = round(best("image") / result["hf_tok_per_s"], 2)
        print(f"engine {result['engine_vs_hf']}x transformers on the image chats", flush=True)
    print(write_result(f"mm_{'cuda' if gpu else 'cpu_quick'}.json", result))


if __name__ == "__main__":
    main()
