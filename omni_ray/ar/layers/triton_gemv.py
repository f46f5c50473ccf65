"""Small-batch GEMV (a decode step of 1-4 sequences) with the elementwise op before it fused in.

At batch 1 each projection reads a few MB of weights, and cuBLAS's M=1 kernels reach about half
the copy bandwidth there; the norm or activation in front of it is one more launch. One kernel:

    y [M, N] = prologue(x) [M, K] @ W[N, K]^T (+ b)

prologues (what the plain-PyTorch model does right before the projection):
  * ``none``:     x
  * ``norm``:     rms_norm(x + residual) * norm_w   (the residual sum is also written: ``res_out``)
  * ``silu_mul``: silu(x[:, :K]) * x[:, K:]          (the MLP's gate/up halves)

Each program owns BLOCK_N outputs of one row and streams its [BLOCK_N, K] weight slice (rows of a
small batch re-read it from L2).
Numerics follow ops.py: fp32 math, rounded to the activation dtype where the reference rounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_M = 4          # larger decode batches use cuBLAS (their GEMMs are efficient already)

_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=2)
            for bn in (8, 16, 32) for bk in (128, 256, 512) for w in (4, 8) if 2048 <= bn * bk <= 8192]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "PRO"])
@triton.jit
def _gemv_kernel(X, R, NW, W, B, Y, RES, N, K, eps,
                 s_xm, s_rm, s_wn, s_ym, s_resm,
                 PRO: tl.constexpr, HAS_R: tl.constexpr, HAS_B: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: BLOCK_N outputs of one row m. The products accumulate in a [BLOCK_N, BLOCK_K]
    tile and are reduced once at the end (no cross-lane reduction in the loop)."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    dt = X.dtype.element_ty
    xrow = X + m * s_xm
    rrow = R + m * s_rm
    if PRO == 1:                                                   # rms norm: this row's rstd first
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            x = tl.load(xrow + offs_k, mask=mk, other=0.0).to(tl.float32)
            if HAS_R:
                x = (x + tl.load(rrow + offs_k, mask=mk, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
                if pid == 0:
                    tl.store(RES + m * s_resm + offs_k, x.to(dt), mask=mk)
            ss += x * x
        rstd = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(W + offs_n[:, None] * s_wn + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)                                      # [BLOCK_N, BLOCK_K]
        if PRO == 2:                                               # silu(gate) * up
            g = tl.load(xrow + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            u = tl.load(xrow + K + offs_k, mask=mask_k, other=0.0)
            x = ((g / (1.0 + tl.exp(-g))).to(dt) * u).to(tl.float32)
        else:
            x = tl.load(xrow + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            if PRO == 1:
                if HAS_R:
                    x = (x + tl.load(rrow + offs_k, mask=mask_k, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
                nw = tl.load(NW + offs_k, mask=mask_k, other=0.0)
                x = ((x * rstd).to(dt) * nw).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_B:
        y += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + m * s_ym + offs_n, y.to(Y.dtype.element_ty), mask=mask_n)


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, prologue: str = "none",
         residual: torch.Tensor | None = None, norm_w: torch.Tensor | None = None, eps: float = 0.0):
    """x [M, K] (silu_mul: [M, 2K]), w [N, K] -> y [M, N]; with prologue="norm" and a residual,
    returns (y, x + residual)."""
    m = x.shape[0]
    n, k = w.shape
    pro = {"none": 0, "norm": 1, "silu_mul": 2}[prologue]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    has_r = residual is not None
    res = torch.empty(m, k, device=x.device, dtype=x.dtype) if has_r else y
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)  # noqa: E731
    _gemv_kernel[grid](x, residual if has_r else x, norm_w if norm_w is not None else w, w,
                       b if b is not None else w, y, res, n, k, eps,
                       x.stride(0), residual.stride(0) if has_r else 0, w.stride(0), y.stride(0),
                       res.stride(0) if has_r else 0, PRO=pro, HAS_R=has_r, HAS_B=b is not None)
    return (y, res) if has_r else y
