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

``add_ln_modulate`` also takes the residual before the norm, where a block adds a branch's output and then
normalizes the sum (Wan: self-attention's gated residual, then the cross-attention's layer norm; the
cross-attention's residual, then the feed-forward's modulated norm; Qwen-Image: the image stream's attention
residual, then its MLP's modulated norm):

    x, y [B, N, D], gate [B, 1, D] or None, bias [D] or None  ->  r = x + (y + bias) * gate,
                                                                  LayerNorm(r) * scale1 + shift

one pass that reads x and y and writes both, instead of a residual kernel and a norm kernel that reads r again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ln_mod(x, m, eps, SC, SH, c, D: tl.constexpr):
    """LayerNorm of a row x (fp32, masked lanes 0) * SC[c] + SH[c], in fp32."""
    mean = tl.sum(x, 0) / D
    xc = tl.where(m, x - mean, 0.0)
    h = xc * tl.rsqrt(tl.sum(xc * xc, 0) / D + eps)
    sc = tl.load(SC + c, mask=m, other=0.0).to(tl.float32)
    sh = tl.load(SH + c, mask=m, other=0.0).to(tl.float32)
    return h * sc + sh


@triton.jit
def _ln_modulate_kernel(X, s_xb, s_xn, SC, s_sc, SH, s_sh, OUT, n_tok, eps, D: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)          # a token (offsets in int64: a video batch passes 2^31 elements)
    b = tl.program_id(1).to(tl.int64)          # a batch row
    c = tl.arange(0, BD)
    m = c < D
    x = tl.load(X + b * s_xb + t * s_xn + c, mask=m, other=0.0).to(tl.float32)
    h = _ln_mod(x, m, eps, SC + b * s_sc, SH + b * s_sh, c, D)
    tl.store(OUT + (b * n_tok + t) * D + c, h.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _add_ln_modulate_kernel(X, s_xb, s_xn, Y, s_yb, s_yn, G, s_g, BIAS, SC, s_sc, SH, s_sh, XOUT, OUT, n_tok, eps,
                            D: tl.constexpr, BD: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BD)
    m = c < D
    x = tl.load(X + b * s_xb + t * s_xn + c, mask=m, other=0.0).to(tl.float32)
    y = tl.load(Y + b * s_yb + t * s_yn + c, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:                               # an output projection's bias, not added by its GEMM
        y = y + tl.load(BIAS + c, mask=m, other=0.0).to(tl.float32)
    if GATED:
        y = y * tl.load(G + b * s_g + c, mask=m, other=0.0).to(tl.float32)
    r = (x + y).to(XOUT.dtype.element_ty)      # the new residual, rounded as the helpers round it
    o = (b * n_tok + t) * D + c
    tl.store(XOUT + o, r, mask=m)
    h = _ln_mod(r.to(tl.float32), m, eps, SC + b * s_sc, SH + b * s_sh, c, D)
    tl.store(OUT + o, h.to(OUT.dtype.element_ty), mask=m)


def ln_modulate_applies(x: torch.Tensor, scale1: torch.Tensor, shift: torch.Tensor, weight=None, bias=None) -> bool:
    """The kernel's conditions: CUDA x [B, n, D] with contiguous rows, scale1 / shift [B, 1, D] (or [1, 1, D]) in
    fp32 or x's dtype with contiguous rows, a layer norm without weight or bias."""
    return (x.is_cuda and x.dim() == 3 and x.stride(-1) == 1 and weight is None and bias is None
            and _row(scale1, x) and _row(shift, x))


def _row(t: torch.Tensor, x: torch.Tensor) -> bool:
    """A modulation row the kernels read: [B, 1, D] or [1, 1, D] for x [B, n, D], fp32 or x's dtype, contiguous rows."""
    return (t.dtype in (torch.float32, x.dtype) and t.dim() == 3 and t.shape[1] == 1 and t.shape[2] == x.shape[2]
            and t.shape[0] in (1, x.shape[0]) and t.stride(-1) == 1)


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


def add_ln_modulate_applies(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, scale1: torch.Tensor,
                            shift: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """``add_ln_modulate``'s conditions: those of ``ln_modulate`` for x, y x's shape and dtype with contiguous rows,
    gate None or [B, 1, D] (or [1, 1, D]) as the modulation, bias None or a contiguous [D]."""
    return (ln_modulate_applies(x, scale1, shift) and y.is_cuda and y.shape == x.shape and y.dtype == x.dtype
            and y.stride(-1) == 1
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == x.shape[2] and bias.is_contiguous()
                                  and bias.dtype in (torch.float32, x.dtype)))
            and (gate is None or _row(gate, x)))


def add_ln_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, eps: float, scale1: torch.Tensor,
                    shift: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's residual and the next norm in one pass: (r, LayerNorm(r) * scale1 + shift) with r = x + y * gate
    (gate None: x + y; with ``bias``: x + (y + bias) * gate), both [B, n, D] in x's dtype. The sum in fp32, rounded
    once to x's dtype (the residual, as the blocks' compiled residual helpers and a plain add round it); the norm of
    the rounded sum as ``ln_modulate``."""
    B, n, D = x.shape
    r = torch.empty(B, n, D, dtype=x.dtype, device=x.device)
    out = torch.empty_like(r)
    if B and n:
        g = y if gate is None else gate                 # a placeholder pointer when not gated
        row = lambda t: t.stride(0) if t.shape[0] > 1 else 0   # noqa: E731 - one modulation row for all, or one each
        _add_ln_modulate_kernel[(n, B)](x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), g,
                                        0 if gate is None else row(gate), y if bias is None else bias, scale1,
                                        row(scale1), shift, row(shift), r, out, n, eps, D=D,
                                        BD=triton.next_power_of_2(D), GATED=gate is not None,
                                        HAS_BIAS=bias is not None, num_warps=8 if D > 2048 else 4)
    return r, out
