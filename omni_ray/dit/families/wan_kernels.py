"""Wan self-attention's q and k in one Triton kernel (CUDA; ``DiTEngineConfig.norm_kernels``, off until timed on a
GPU; the layer norm + modulation kernel beside it: ``ln_modulate_kernel.py``):

    the fused q/k/v projection [B, N, 3 * H * d]  ->  q, k [2, B, N, H, d] (each RMS-normed across all heads,
                                                       then Wan's RoPE on pairs (2i, 2i + 1) of each head)

It replaces the block's compiled ``rms_rope`` helper, run once for q and once for k: Inductor's kernels for it ran
at 0.2-1 TB/s on the 81-frame rows, and once the process has seen rows of another width they are recompiled with
symbolic sizes (docs/benchmarks.md, Wan). One program per (token, batch row) reads the token's q and k once and
writes them once, the row width a compile-time constant.

Numerics follow ``wan_block.rms_rope`` (``F.rms_norm``'s decomposition, then the RoPE): the mean of squares in
fp32, the row times its reciprocal RMS times the weight in fp32, rounded once to the activation dtype; the rotation
in fp32 and one rounding at the end. ``applies`` says when the kernel takes a call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_row(src, W, eps, cos, sin, dst, D: tl.constexpr, BD: tl.constexpr, OUT: tl.constexpr):
    """One token's row [D] (every head): RMS norm with the weight W [D], RoPE by cos / sin [BD/2] fp32."""
    c = tl.arange(0, BD)
    m = c < D
    x = tl.load(src + c, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
    h = (x * r * w).to(OUT).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(h, [BD // 2, 2]))
    o = tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), [BD])
    tl.store(dst + c, o.to(OUT), mask=m)


@triton.jit
def _qk_kernel(SRC, s_b, s_n, QW, KW, COS, SIN, OUT, o_2, o_b, q_eps, k_eps,
               D: tl.constexpr, BD: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)          # a token (offsets in int64: a video batch passes 2^31 elements)
    b = tl.program_id(1).to(tl.int64)          # a batch row
    p = tl.arange(0, BD // 2)                  # pairs across the row; each head's pairs use the same angles
    pm = p < D // 2
    cos = tl.load(COS + t * HALF + p % HALF, mask=pm, other=0.0)
    sin = tl.load(SIN + t * HALF + p % HALF, mask=pm, other=0.0)
    src = SRC + b * s_b + t * s_n              # [q | k | v], each D wide
    dst = OUT + b * o_b + t * D
    out_t = OUT.dtype.element_ty
    _norm_rope_row(src, QW, q_eps, cos, sin, dst, D, BD, out_t)
    _norm_rope_row(src + D, KW, k_eps, cos, sin, dst + o_2, D, BD, out_t)


def applies(qkv: torch.Tensor, norm_q, norm_k, cos: torch.Tensor | None) -> bool:
    """The kernel's conditions: a CUDA projection [B, N, 3 * D] with contiguous rows, both RMS norms with
    weights and an eps, fp32 RoPE tables with a row per token."""
    return (qkv.is_cuda and qkv.dim() == 3 and qkv.stride(-1) == 1 and qkv.shape[-1] % 3 == 0
            and cos is not None and cos.dtype == torch.float32 and cos.shape[0] == qkv.shape[1]
            and norm_q.weight is not None and norm_k.weight is not None
            and norm_q.eps is not None and norm_k.eps is not None)


def qk_rms_rope(qkv: torch.Tensor, norm_q, norm_k, heads: int, cos: torch.Tensor, sin: torch.Tensor):
    """(q, k), each [B, N, H, d] (views of one [2, B, N, H, d] tensor), from the fused projection qkv
    [B, N, 3 * H * d]; ``norm_q`` / ``norm_k`` the attention's RMS norms, cos / sin [N, d/2] fp32."""
    B, N, three_d = qkv.shape
    D = three_d // 3
    half = D // heads // 2
    out = torch.empty(2, B, N, D, dtype=qkv.dtype, device=qkv.device)
    if N and B:
        _qk_kernel[(N, B)](qkv, qkv.stride(0), qkv.stride(1), norm_q.weight, norm_k.weight, cos.contiguous(),
                           sin.contiguous(), out, out.stride(0), out.stride(1), norm_q.eps, norm_k.eps,
                           D=D, BD=triton.next_power_of_2(D), HALF=half, num_warps=8 if D > 2048 else 4)
    q, k = out.unflatten(3, (heads, -1))
    return q, k

