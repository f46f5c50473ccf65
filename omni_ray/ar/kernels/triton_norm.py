"""Row-wise Triton kernels for the ops between projections on CUDA: RMS norm (with the residual
add fused in) and SiLU-and-mul, one launch each.

They replace ``torch.compile``'d versions of ``ops.rms_norm`` / ``add_rms_norm`` / ``silu_and_mul``
because the eager path (prefill and mixed prefill + decode steps, which CUDA graphs do not cover)
is bound by the host: a compiled region costs its guard checks and wrappers on every call, a
Triton launch only its launch. Numerics follow ``ops.py`` (HF's): the residual sum rounded to the
activation dtype, the norm in fp32, rounded before the weight; SiLU in fp32, rounded before the
product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, Y, RO, eps, s_x, s_r, s_y, s_ro, H: tl.constexpr, BLOCK: tl.constexpr,
                     RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(X + row * s_x + offs, mask=mask, other=0.0)
    if RESIDUAL:
        x = x + tl.load(R + row * s_r + offs, mask=mask, other=0.0)     # in the activation dtype, as HF
        tl.store(RO + row * s_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    y = (xf * rstd).to(X.dtype.element_ty).to(tl.float32) * tl.load(W + offs, mask=mask).to(tl.float32)
    tl.store(Y + row * s_y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    shape, h = x.shape, x.shape[-1]
    x2 = _rows(x.reshape(-1, h))
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    r2 = _rows(residual.reshape(-1, h)) if residual is not None else x2
    ro = torch.empty_like(x2) if residual is not None else y
    if x2.shape[0]:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, y, ro, eps, x2.stride(0), r2.stride(0), y.stride(0),
                                         ro.stride(0), H=h, BLOCK=block, RESIDUAL=residual is not None,
                                         num_warps=min(16, max(1, block // 256)))
    return y.view(shape), ro.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] -> weight * norm(x), in x's dtype."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(norm(x + residual), x + residual), one launch."""
    return _norm(x, residual, weight, eps)


@triton.jit
def _silu_mul_kernel(X, Y, s_x, s_y, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(X + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * s_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * s_y + offs, (s * u).to(Y.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [N, 2I] (gate, up) -> silu(gate) * up [N, I]."""
    x2 = _rows(x.reshape(-1, x.shape[-1]))
    i = x2.shape[1] // 2
    y = torch.empty(x2.shape[0], i, device=x.device, dtype=x.dtype)
    if x2.shape[0]:
        block = min(2048, triton.next_power_of_2(i))
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(i, block))](x2, y, x2.stride(0), y.stride(0), I=i, BLOCK=block,
                                                               num_warps=4)
    return y.view(*x.shape[:-1], i)
