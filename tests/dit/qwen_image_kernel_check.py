"""Run with TRITON_INTERPRET=1 (tests/dit/test_qwen_image_kernels.py): the Triton joint q / k / v kernel against
the block's eager helpers, on CPU tensors through Triton's interpreter. Prints the max differences per dtype."""

import sys

import torch
from diffusers.models.normalization import RMSNorm

from omni_ray.dit.families import qwen_image_kernels as qk
from omni_ray.dit.families.qwen_image_block import joint_qk


class Attn(torch.nn.Module):
    def __init__(self, d, dtype, affine, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            n = RMSNorm(d, eps=1e-6, elementwise_affine=affine)
            if affine:
                n.weight.data = (torch.rand(d, generator=g) + 0.5).to(dtype)
            setattr(self, name, n)


def check(dtype, affine, B=2, T=5, N=7, H=3, d=16, image_first=False):
    g = torch.Generator().manual_seed(0)
    cqkv = torch.randn(B, T, 3, H, d, generator=g).to(dtype)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(dtype)
    ang = torch.rand(T + N, d // 2, generator=g) * 6
    rope = (ang[T:].cos(), ang[T:].sin(), ang[:T].cos(), ang[:T].sin())
    a = Attn(d, dtype, affine)
    assert qk.applies(cqkv, qkv, a)
    q, k, v = qk.joint_qkv(cqkv, qkv, a, rope, image_first)
    rq = joint_qk(cqkv[:, :, 0], qkv[:, :, 0], a.norm_added_q.weight, a.norm_q.weight, 1e-6, 1e-6, rope,
                  image_first).transpose(1, 2)
    rk = joint_qk(cqkv[:, :, 1], qkv[:, :, 1], a.norm_added_k.weight, a.norm_k.weight, 1e-6, 1e-6, rope,
                  image_first).transpose(1, 2)
    vs = [cqkv[:, :, 2], qkv[:, :, 2]]
    rv = torch.cat(vs[::-1] if image_first else vs, dim=1).transpose(1, 2)
    assert q.shape == rq.shape == (B, H, T + N, d) and q.dtype == rq.dtype
    # bf16: in ulps at each head row's largest value. Triton's interpreter rounds to bf16 by truncation (the GPU and
    # torch to nearest): up to one ulp more per rounding (three in a row, the last after the rotation mixes two
    # rounded values), so the interpreter's bf16 bound is loose (8) and only catches a rounding at the wrong place or
    # a wrong pair; fp32 checks the arithmetic itself (absolute), the GPU test bf16 within 2 ulps
    scale = (rq.float().abs().amax(-1, keepdim=True) * 2.0 ** -7) if dtype == torch.bfloat16 else 1.0
    diffs = [((x.float() - y.float()).abs() / scale).max().item() for x, y in ((q, rq), (k, rk), (v, rv))]
    print(f"{dtype} affine={affine} image_first={image_first} q {diffs[0]:.3g} k {diffs[1]:.3g} v {diffs[2]:.3g}")
    return diffs


if __name__ == "__main__":
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        for affine in (True, False):
            for image_first in (False, True):
                worst[(dtype, affine, image_first)] = max(check(dtype, affine, image_first=image_first))
    ok = all(w <= (1e-5 if dt == torch.float32 else 8.0) for (dt, *_), w in worst.items())
    sys.exit(0 if ok else 1)
