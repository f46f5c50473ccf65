"""Wan self-attention's q and k in one Triton kernel (CUDA; ``DiTEngineConfig.norm_kernels``, on by
default; the layer norm + modulation kernel beside it: ``ln_modulate_kernel.py``):

    the fused q/k/v projection [B, N, 3 * H * d]  ->  q, k [2, B, N, H, d] (each RMS-normed across all heads,
                                                       then Wan's RoPE on pairs (2i, 2i + 1) of each head)

It replaces the block's compiled ``rms_rope`` helper, run once for q and once for k: Inductor's kernels for it ran
at 0.2-1 TB/s on the 81-frame rows, and once the process has seen rows of another width they are recompiled with
symbolic sizes (docs/benchmarks.md, Wan). One program per (token, batch row) reads the token's q and k once and
writes them once, as [heads, d] (the RoPE angles loaded once for all heads), the widths compile-time constants.

Numerics follow ``wan_block.rms_rope`` (``F.rms_norm``'s decomposition, then the RoPE): the mean of squares in
fp32, the row times its reciprocal RMS times the weight in fp32, rounded once to the activation dtype; the rotation
in fp32 and one rounding at the end. ``applies`` says when the kernel takes a call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_heads(src, W, eps, cos, sin, dst, H: tl.constexpr, BH: tl.constexpr, d: tl.constexpr,
                     DP: tl.constexpr, OUT: tl.constexpr):
    """One token's row as [heads, d] (padded to [BH, DP], powers of two): RMS norm over all of it with the weight
    W [H * d], then RoPE on each head's pairs by cos / sin [1, DP/2] fp32."""
    rows = tl.arange(0, BH)[:, None]
    cols = tl.arange(0, DP)[None, :]
    off = rows * d + cols
    m = (rows < H) & (cols < d)
    x = tl.load(src + off, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(tl.sum(x * x, 1), 0) / (H * d) + eps)
    w = tl.load(W + off, mask=m, other=0.0).to(tl.float32)
    h = (x * r * w).to(OUT).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(h, [BH, DP // 2, 2]))
    o = tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), [BH, DP])
    tl.store(dst + off, o.to(OUT), mask=m)


@triton.jit
def _qk_kernel(SRC, s_b, s_n, QW, KW, COS, SIN, OUT, o_2, o_b, q_eps, k_eps,
               H: tl.constexpr, BH: tl.constexpr, d: tl.constexpr, DP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)          # a token (offsets in int64: a video batch passes 2^31 elements)
    b = tl.program_id(1).to(tl.int64)          # a batch row
    half = tl.arange(0, DP // 2)[None, :]      # every head's pairs use the token's angles
    cos = tl.load(COS + t * (d // 2) + half, mask=half < d // 2, other=0.0)
    sin = tl.load(SIN + t * (d // 2) + half, mask=half < d // 2, other=0.0)
    src = SRC + b * s_b + t * s_n              # [q | k | v], each H * d wide
    dst = OUT + b * o_b + t * (H * d)
    out_t = OUT.dtype.element_ty
    _norm_rope_heads(src, QW, q_eps, cos, sin, dst, H, BH, d, DP, out_t)
    _norm_rope_heads(src + H * d, KW, k_eps, cos, sin, dst + o_2, H, BH, d, DP, out_t)


def applies(qkv: torch.Tensor, norm_q, norm_k, cos: torch.Tensor | None) -> bool:
    """The kernel's conditions: a CUDA projection [B, N, 3 * D] with contiguous rows, both RMS norms with
    weights and an eps, fp32 RoPE tables [N, d/2] with the head dim d dividing D (any even d: padded to a power of
    two inside the kernel)."""
    d = 2 * cos.shape[-1] if cos is not None and cos.dim() == 2 else 0
    return (qkv.is_cuda and qkv.dim() == 3 and qkv.stride(-1) == 1 and qkv.shape[-1] % 3 == 0
            and d > 0 and (qkv.shape[-1] // 3) % d == 0
            and cos.dtype == torch.float32 and cos.shape[0] == qkv.shape[1]
            and norm_q.weight is not None and norm_k.weight is not None
            and norm_q.eps is not None and norm_k.eps is not None)


def qk_rms_rope(qkv: torch.Tensor, norm_q, norm_k, heads: int, cos: torch.Tensor, sin: torch.Tensor):
    """(q, k), each [B, N, H, d] (views of one [2, B, N, H, d] tensor), from the fused projection qkv
    [B, N, 3 * H * d]; ``norm_q`` / ``norm_k`` the attention's RMS norms, cos / sin [N, d/2] fp32."""
    B, N, three_d = qkv.shape
    D = three_d // 3
    out = torch.empty(2, B, N, D, dtype=qkv.dtype, device=qkv.device)
    if N and B:
        _qk_kernel[(N, B)](qkv, qkv.stride(0), qkv.stride(1), norm_q.weight, norm_k.weight, cos.contiguous(),
                           sin.contiguous(), out, out.stride(0), out.stride(1), norm_q.eps, norm_k.eps,
                           H=heads, BH=triton.next_power_of_2(heads), d=D // heads,
                           DP=triton.next_power_of_2(D // heads),
                           num_warps=8 if D > 2048 else 4)
    q, k = out.unflatten(3, (heads, -1))
    return q, k

