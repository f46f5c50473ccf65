"""Small-batch GEMV (a decode step of 1-4 sequences) with the elementwise op before it fused in.

At batch 1 each projection reads a few MB of weights and the work is pure memory traffic; the
norm or activation in front of it is one more launch. One kernel:

    y [M, N] = prologue(x) [M, K] @ W[N, K]^T (+ b)

prologues (what the plain-PyTorch model does right before the projection):
  * ``none``:     x
  * ``norm``:     rms_norm(x + residual) * norm_w   (the residual sum is also written: ``res_out``)
  * ``silu_mul``: silu(x[:, :K]) * x[:, K:]          (the MLP's gate/up halves)

Each program owns BLOCK_N output rows of one input row m and reads its [BLOCK_N, K] weight slice
in an unrolled loop (K is a compile-time constant), so every weight load of the program can be in
flight at once: with a small BLOCK_N there are hundreds of programs, each with a few KB to fetch,
which is what a memory-bound kernel needs to reach the copy bandwidth. Out-of-range rows are
clamped (loaded, never stored) so weight loads need no mask and vectorise. The x row is small and
read from L1/L2 by every program; the norm's statistic is recomputed by each (K values).
Numerics follow ops.py: fp32 math, rounded to the activation dtype where the reference rounds (a
product of two bf16/fp16 values is exact in fp32, so rounding it once gives the half-precision op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from omni_ray.ar.kernels.pdl import use_pdl

MAX_M = 4          # larger decode batches use cuBLAS (their GEMMs are efficient already)
PROLOGUES = {"none": 0, "norm": 1, "silu_mul": 2}


@triton.jit
def _x_chunk(xrow, rrow, NW, offs_k, mask_k, rstd, K: tl.constexpr, PRO: tl.constexpr, HAS_R: tl.constexpr):
    """This chunk of prologue(x), fp32."""
    dt = xrow.dtype.element_ty
    if PRO == 2:                                                     # silu(gate) * up
        g = tl.load(xrow + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        u = tl.load(xrow + K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        x = ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
    else:
        x = tl.load(xrow + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        if PRO == 1:
            if HAS_R:
                x = (x + tl.load(rrow + offs_k, mask=mask_k, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
            nw = tl.load(NW + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x = ((x * rstd).to(dt).to(tl.float32) * nw).to(dt).to(tl.float32)
    return x


@triton.jit
def _w_chunk(W, rows, s_wn, offs_k, mask_k, EVEN: tl.constexpr):
    wp = W + rows[:, None] * s_wn + offs_k[None, :]                  # [BLOCK_N, BLOCK_K]
    if EVEN:
        return tl.load(wp, eviction_policy="evict_first")
    return tl.load(wp, mask=mask_k[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _gemv_kernel(X, R, NW, W, B, Y, RES, N, eps,
                 s_xm, s_rm, s_wn, s_ym, s_resm,
                 K: tl.constexpr, PRO: tl.constexpr, HAS_R: tl.constexpr, HAS_B: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.where(mask_n, offs_n, N - 1)                          # clamped: unmasked weight loads
    xrow = X + m * s_xm
    rrow = R + m * s_rm
    EVEN: tl.constexpr = K % BLOCK_K == 0
    offs0 = tl.arange(0, BLOCK_K)
    w0 = _w_chunk(W, rows, s_wn, offs0, offs0 < K, EVEN)             # weights need not wait (PDL)
    if PDL:
        gdc_wait()                                                   # x is the previous kernel's output
    rstd = 0.0
    if PRO == 1:                                                     # rms norm: this row's rstd first
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            x = tl.load(xrow + offs_k, mask=mk, other=0.0).to(tl.float32)
            if HAS_R:
                r = tl.load(rrow + offs_k, mask=mk, other=0.0).to(tl.float32)
                x = (x + r).to(X.dtype.element_ty).to(tl.float32)
                if pid == 0:
                    tl.store(RES + m * s_resm + offs_k, x.to(X.dtype.element_ty), mask=mk)
            ss += x * x
        rstd = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    acc = w0.to(tl.float32) * _x_chunk(xrow, rrow, NW, offs0, offs0 < K, rstd, K, PRO, HAS_R)[None, :]
    for k0 in tl.static_range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _w_chunk(W, rows, s_wn, offs_k, mask_k, EVEN)
        acc += w.to(tl.float32) * _x_chunk(xrow, rrow, NW, offs_k, mask_k, rstd, K, PRO, HAS_R)[None, :]
    y = tl.sum(acc, 1)
    if HAS_B:
        y += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + m * s_ym + offs_n, y.to(Y.dtype.element_ty), mask=mask_n)


def default_config(n: int, k: int) -> dict:
    """Tile sizes for an [n, k] weight, from the sweep in benchmarks/bench_gemv.py on an H100
    (Qwen3-0.6B's projections): 8 rows per program (4 for small square-ish weights), K in chunks of
    up to 2048, 8 warps once a program's tile reaches 16 K elements."""
    block_k = min(2048, triton.next_power_of_2(k))
    block_n = 4 if n <= 1024 and k <= 2048 else 8
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8 if block_n * block_k >= 16384 else 4}


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, prologue: str = "none",
         residual: torch.Tensor | None = None, norm_w: torch.Tensor | None = None, eps: float = 0.0,
         config: dict | None = None, pdl: bool | None = None):
    """x [M, K] (silu_mul: [M, 2K]), w [N, K] -> y [M, N]; with prologue="norm" and a residual,
    returns (y, x + residual). ``config``: tile sizes (default: ``default_config``); ``pdl``:
    programmatic dependent launch (default: where the GPU has it, ``pdl.py``)."""
    m = x.shape[0]
    n, k = w.shape
    assert w.stride(1) == 1 and x.stride(-1) == 1
    cfg = config or default_config(n, k)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    has_r = residual is not None
    res = torch.empty(m, k, device=x.device, dtype=x.dtype) if has_r else y
    pdl = use_pdl(x) if pdl is None else pdl
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), m)
    _gemv_kernel[grid](x, residual if has_r else x, norm_w if norm_w is not None else w, w,
                       b if b is not None else w, y, res, n, eps,
                       x.stride(0), residual.stride(0) if has_r else 0, w.stride(0), y.stride(0),
                       res.stride(0) if has_r else 0, K=k, PRO=PROLOGUES[prologue], HAS_R=has_r,
                       HAS_B=b is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PDL=pdl,
                       num_warps=cfg.get("num_warps", 4), num_stages=1, launch_pdl=pdl)
    return (y, res) if has_r else y
