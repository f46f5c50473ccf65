"""The Wan block's norms as Triton kernels (CUDA; ``DiTEngineConfig.norm_kernels``, off until timed on a GPU):

    qk_rms_rope:  the fused q/k/v projection [B, N, 3 * H * d]  ->  q, k [2, B, N, H, d] (each RMS-normed across
                  all heads, then Wan's RoPE on pairs (2i, 2i + 1) of each head)
    ln_modulate:  x [B, N, D]  ->  LayerNorm(x) * (1 + scale) + shift, the modulation [B, 1, D] fp32

They replace the block's compiled ``rms_rope`` (run once for q and once for k) and ``modulate`` helpers: Inductor's
kernels for them ran at 0.2-1 TB/s on the 81-frame rows, and once the process has seen rows of another width they
are recompiled with symbolic sizes (docs/benchmarks.md, Wan). One program per (token, batch row) reads the token's
row once and writes it once, the row width a compile-time constant.

Numerics: ``qk_rms_rope`` follows ``wan_block.rms_rope`` (``F.rms_norm``'s decomposition, then the RoPE): the mean
of squares in fp32, the row times its reciprocal RMS times the weight in fp32, rounded once to the activation
dtype; the rotation in fp32 and one rounding at the end. ``ln_modulate`` follows ``wan_block.modulate``: the layer
norm in fp32 (the variance from the centred row), the modulation in fp32, one rounding. ``applies`` /
``ln_modulate_applies`` say when a kernel takes a call.
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
    t = tl.program_id(0)                       # a token
    b = tl.program_id(1)                       # a batch row
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


@triton.jit
def _ln_modulate_kernel(X, s_xb, s_xn, SC, s_sc, SH, s_sh, OUT, n_tok, eps, D: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0)                       # a token
    b = tl.program_id(1)                       # a batch row
    c = tl.arange(0, BD)
    m = c < D
    x = tl.load(X + b * s_xb + t * s_xn + c, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / D
    xc = tl.where(m, x - mean, 0.0)
    h = xc * tl.rsqrt(tl.sum(xc * xc, 0) / D + eps)
    sc = tl.load(SC + b * s_sc + c, mask=m, other=0.0)
    sh = tl.load(SH + b * s_sh + c, mask=m, other=0.0)
    tl.store(OUT + (b * n_tok + t) * D + c, (h * sc + sh).to(OUT.dtype.element_ty), mask=m)


def ln_modulate_applies(x: torch.Tensor, scale1: torch.Tensor, shift: torch.Tensor) -> bool:
    """The layer norm + modulation kernel's conditions: CUDA x [B, n, D] with contiguous rows, fp32 scale1 /
    shift [B, 1, D] (or [1, 1, D]) with contiguous rows."""
    return (x.is_cuda and x.dim() == 3 and x.stride(-1) == 1
            and all(t.dtype == torch.float32 and t.dim() == 3 and t.shape[1] == 1 and t.shape[2] == x.shape[2]
                    and t.shape[0] in (1, x.shape[0]) and t.stride(-1) == 1 for t in (scale1, shift)))


def ln_modulate(x: torch.Tensor, eps: float, scale1: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``wan_block.modulate``: (LayerNorm(x) in fp32 * scale1 + shift) in x's dtype, [B, n, D] contiguous. The
    mean and the variance of each row in fp32 (two passes over the row in registers), one rounding at the end."""
    B, n, D = x.shape
    out = torch.empty(B, n, D, dtype=x.dtype, device=x.device)
    if B and n:
        _ln_modulate_kernel[(n, B)](x, x.stride(0), x.stride(1), scale1, scale1.stride(0) if scale1.shape[0] > 1 else 0,
                                    shift, shift.stride(0) if shift.shape[0] > 1 else 0, out, n, eps,
                                    D=D, BD=triton.next_power_of_2(D), num_warps=8 if D > 2048 else 4)
    return out
