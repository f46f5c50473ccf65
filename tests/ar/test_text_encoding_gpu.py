"""Qwen-Image's text encoder at its real shape on CUDA (``shape:qwen-image``: the diffusers layout with a
7B Qwen2.5-VL of random weights, bf16): the AR engine loads ``text_encoder/`` + ``tokenizer/`` from the
pipeline directory, its hidden states follow diffusers' ``encode_prompt`` (bf16, so compared by cosine),
the template comes from the prefix cache, and the encode time of a burst is printed beside diffusers'.

    python -m pytest -q -s -p no:cacheprovider tests/ar/test_text_encoding_gpu.py
"""

from __future__ import annotations

import gc
import time

import pytest
import torch

from omni_ray.ar import LLM
from omni_ray.ar.text_encoding import QWEN_IMAGE
from omni_ray.testing import resolve_model

pytestmark = pytest.mark.gpu

PROMPTS = ["a red fox in the snow at dawn, soft light, 35mm photo",
           "blurry, low quality",
           "a lighthouse on a rocky cliff at dusk, waves crashing below and gulls overhead, oil painting"]


def test_tiny_text_encoder_on_cuda_equals_cpu_and_hits_equal_misses():
    """The CUDA paths (Triton attention over a cached prefix, fused kernels) give the CPU engine's rows."""
    from omni_ray.ar.text_encoding import QWEN_IMAGE as enc
    from tests.ar.test_text_encoding import make_llm

    want = make_llm("tiny:qwen-image").encode(PROMPTS, encoding=enc)
    gpu = make_llm("tiny:qwen-image", device="cuda", dtype="float32", enforce_eager=False, warmup=False)
    first = gpu.encode(PROMPTS, encoding=enc)                # one step, no hits
    s0 = gpu.engine_stats()
    hit = [gpu.encode(p, encoding=enc)[0] for p in PROMPTS]   # each after the template's cached blocks
    s1 = gpu.engine_stats()
    assert s1["prefix_cache_hit_tokens"] - s0["prefix_cache_hit_tokens"] == len(PROMPTS) * (34 // 8 * 8)
    for a, b, w in zip(first, hit, want):
        torch.testing.assert_close(a, w, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def test_shape_qwen_image_text_encoder_on_cuda():
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = resolve_model("shape:qwen-image")
    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder", dtype=torch.bfloat16).cuda()
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=enc.eval(), transformer=None,
                             tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"))
    with torch.inference_mode():
        embeds, mask = pipe.encode_prompt(PROMPTS, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            pipe.encode_prompt(PROMPTS, device="cuda")
        torch.cuda.synchronize()
        ref_ms = (time.perf_counter() - t0) / 3 * 1000
    want = [e[m.bool()].cpu() for e, m in zip(embeds, mask)] if mask is not None else list(embeds.cpu())
    del pipe, enc, embeds
    gc.collect()
    torch.cuda.empty_cache()

    llm = LLM(str(path), device="cuda", dtype="bfloat16", kvcache_block_size=16, num_kvcache_blocks=512,
              max_model_len=2048)
    assert llm.layout.pipeline == "QwenImagePipeline" and llm.arch.hidden_size == 3584
    got = llm.encode(PROMPTS, encoding=QWEN_IMAGE)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.isfinite(g).all()
        cos = _cos_rows(g, w)
        print(f"rows {g.shape[0]}: cosine to diffusers min {cos.min():.4f} mean {cos.mean():.4f}")
        assert cos.mean() > 0.99 and cos.min() > 0.95
    s0 = llm.engine_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        again = llm.encode(PROMPTS, encoding=QWEN_IMAGE)
    torch.cuda.synchronize()
    ours_ms = (time.perf_counter() - t0) / 3 * 1000
    s1 = llm.engine_stats()
    assert s1["prefix_cache_hit_tokens"] - s0["prefix_cache_hit_tokens"] == 3 * len(PROMPTS) * (34 // 16 * 16)
    for a, b in zip(again, got):                              # hits against the first misses
        assert _cos_rows(a, b).min() > 0.99
    print(f"encode {len(PROMPTS)} prompts: omni-ray {ours_ms:.1f} ms (template cached), "
          f"diffusers encode_prompt {ref_ms:.1f} ms")
