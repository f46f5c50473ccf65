"""One Triton kernel for what sits between the QKV projection and attention on CUDA:

    qkv [N, (Hq + 2 Hkv) D]  ->  q [N, Hq, D]            (per-head RMS norm (Qwen3), rotary)
                             ->  k, v into the paged cache at slot_mapping[N]  (k normed + rotated)

It replaces a split, two norms, two rotaries, a contiguous copy and the KV store (five to seven
launches per layer) by one, which matters at batch 1 where every launch costs more than its work.
cos/sin are read from the [max_pos, D/2] fp32 tables by position inside the kernel.
Numerics follow ``ops.qkv_norm_rope``: the norm in fp32, rounded to the activation dtype before
the weight, the rotary in fp32 (one rounding at the end).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from omni_ray.ar.kernels.pdl import use_pdl


@triton.jit
def _qkv_kernel(QKV, POS, COS, SIN, QW, KW, SLOT, Q, KC, VC, eps,
                s_qkv, s_pos, s_slot, s_q, s_qh, s_cs, s_ch,
                HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr,
                STORE: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    t = tl.program_id(0)
    h = tl.program_id(1)                       # 0..HQ-1: a query head; HQ..HQ+HKV-1: a key/value head
    half = tl.arange(0, D // 2)
    is_q = h < HQ
    col = h * D                                # q heads, then k heads, then v heads in the packed row
    row = QKV + t * s_qkv
    pos = tl.load(POS + t * s_pos).to(tl.int64)        # written by the step's input preparation
    cos = tl.load(COS + pos * (D // 2) + half)
    sin = tl.load(SIN + pos * (D // 2) + half)
    if PDL:
        gdc_wait()                                     # qkv is the previous kernel's output
    x1 = tl.load(row + col + half).to(tl.float32)
    x2 = tl.load(row + col + D // 2 + half).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / D + eps)
        w = tl.where(is_q, 0, 1)               # which weight: q_norm or k_norm
        w1 = tl.load(QW + half) * (1 - w) + tl.load(KW + half) * w
        w2 = tl.load(QW + D // 2 + half) * (1 - w) + tl.load(KW + D // 2 + half) * w
        x1 = (x1 * rstd).to(QKV.dtype.element_ty).to(tl.float32) * w1.to(tl.float32)
        x2 = (x2 * rstd).to(QKV.dtype.element_ty).to(tl.float32) * w2.to(tl.float32)
        x1 = x1.to(QKV.dtype.element_ty).to(tl.float32)
        x2 = x2.to(QKV.dtype.element_ty).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(Q.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(Q.dtype.element_ty)
    if h < HQ:
        out = Q + t * s_q + h * s_qh
        tl.store(out + half, o1)
        tl.store(out + D // 2 + half, o2)
    elif STORE:
        kh = h - HQ
        slot = tl.load(SLOT + t * s_slot).to(tl.int64)
        kdst = KC + slot * s_cs + kh * s_ch
        tl.store(kdst + half, o1)
        tl.store(kdst + D // 2 + half, o2)
        vsrc = row + (HQ + HKV + kh) * D
        vdst = VC + slot * s_cs + kh * s_ch
        tl.store(vdst + half, tl.load(vsrc + half))
        tl.store(vdst + D // 2 + half, tl.load(vsrc + D // 2 + half))


def qkv_norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        nh: int, nkv: int, d: int, q_w: torch.Tensor | None, k_w: torch.Tensor | None,
                        eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv [N, (nh + 2 nkv) d], positions [N], cos/sin [max_pos, d/2] fp32 -> q [N, nh, d];
    k (normed, rotated) and v written to k_cache/v_cache [blocks, block_size, nkv, d] at slot_mapping."""
    n = qkv.shape[0]
    q = torch.empty(n, nh, d, device=qkv.device, dtype=qkv.dtype)
    if n == 0:
        return q
    store = k_cache.numel() > 0
    kc = k_cache.view(-1, nkv, d) if store else q
    vc = v_cache.view(-1, nkv, d) if store else q
    norm = q_w is not None
    pdl = use_pdl(qkv)
    _qkv_kernel[(n, nh + (nkv if store else 0))](
        qkv, positions, cos, sin, q_w if norm else cos, k_w if norm else cos, slot_mapping, q, kc, vc, eps,
        qkv.stride(0), positions.stride(0), slot_mapping.stride(0), q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), HQ=nh, HKV=nkv, D=d, NORM=norm, STORE=store, PDL=pdl,
        num_warps=1, launch_pdl=pdl)
    return q
