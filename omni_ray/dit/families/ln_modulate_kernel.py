"""Layer norm (no weight, no bias) + modulation in one Triton kernel (CUDA; ``DiTEngineConfig.norm_kernels``, on by
default), for the DiT blocks' adaptive norms:

    x [B, N, D]  ->  LayerNorm(x) * scale1 + shift, scale1 / shift [B, 1, D] (one row per batch row, or one for all)

It replaces the blocks' compiled layer norm + modulation helpers (Wan's ``modulate``, Qwen-Image's ``ln_modulate``;
and Wan's cross-attention ``layer_norm``, its weight and bias as the one modulation row):
one program per (token, batch row) reads the token's row once and writes it once, the row width a compile-time
constant whatever other shapes the process has seen (Inductor's reductions recompile with symbolic sizes once a
process has seen another width: docs/benchmarks.md, Wan). Numerics: Wan's ``modulate`` (the layer norm and the
modulation in fp32, one rounding); against Qwen-Image's eager helper (rounded after the norm, the product and the
sum) it differs by those roundings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ln_modulate_kernel(X, s_xb, s_xn, SC, s_sc, SH, s_sh, OUT, n_tok, eps, D: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)          # a token (offsets in int64: a video batch passes 2^31 elements)
    b = tl.program_id(1).to(tl.int64)          # a batch row
    c = tl.arange(0, BD)
    m = c < D
    x = tl.load(X + b * s_xb + t * s_xn + c, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / D
    xc = tl.where(m, x - mean, 0.0)
    h = xc * tl.rsqrt(tl.sum(xc * xc, 0) / D + eps)
    sc = tl.load(SC + b * s_sc + c, mask=m, other=0.0).to(tl.float32)
    sh = tl.load(SH + b * s_sh + c, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + (b * n_tok + t) * D + c, (h * sc + sh).to(OUT.dtype.element_ty), mask=m)


def ln_modulate_applies(x: torch.Tensor, scale1: torch.Tensor, shift: torch.Tensor, weight=None, bias=None) -> bool:
    """The kernel's conditions: CUDA x [B, n, D] with contiguous rows, scale1 / shift [B, 1, D] (or [1, 1, D]) in
    fp32 or x's dtype with contiguous rows, a layer norm without weight or bias."""
    return (x.is_cuda and x.dim() == 3 and x.stride(-1) == 1 and weight is None and bias is None
            and all(t.dtype in (torch.float32, x.dtype) and t.dim() == 3 and t.shape[1] == 1
                    and t.shape[2] == x.shape[2] and t.shape[0] in (1, x.shape[0]) and t.stride(-1) == 1
                    for t in (scale1, shift)))


def ln_modulate(x: torch.Tensor, eps: float, scale1: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(LayerNorm(x) * scale1 + shift) in x's dtype, [B, n, D] contiguous: the mean and the variance of each row
    in fp32 (two passes over the row in registers), the modulation in fp32, one rounding at the end."""
    B, n, D = x.shape
    out = torch.empty(B, n, D, dtype=x.dtype, device=x.device)
    if B and n:
        _ln_modulate_kernel[(n, B)](x, x.stride(0), x.stride(1), scale1, scale1.stride(0) if scale1.shape[0] > 1 else 0,
                                    shift, shift.stride(0) if shift.shape[0] > 1 else 0, out, n, eps,
                                    D=D, BD=triton.next_power_of_2(D), num_warps=8 if D > 2048 else 4)
    return out
