"""Triton kernels that read K/V through block tables (no gather of whole sequences).

* ``paged_decode``: one query token per sequence; a program handles one (sequence, KV head,
  split) and all the query heads of that KV head's group at once (GQA packed into the M dim);
  split-K ("flash-decoding") with a log-sum-exp merge when the batch is too small to fill the GPU.
* ``paged_prefill``: variable-length query chunks with causal masking against their cached
  prefix (prefix caching and chunked prefill both land here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from omni_ray.ar.kernels.pdl import use_pdl
from omni_ray.ar.kernels.tiling import prefill_block_m

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(Q, K, V, BT, CL, O, LSE, OUT, LOCK, qk_scale,
                   s_qb, s_qh, s_kb, s_kt, s_kh, s_btb, s_ob, s_os, s_oh, s_lb, s_ls, s_fb, s_fh,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
                   MERGE: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(CL + b)                      # context lengths and block tables: the step's inputs
    if PDL:
        gdc_wait()                             # q and this step's K/V: the previous kernel's output
    per = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    start = s * per
    end = tl.minimum(start + per, ctx)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    heads = h * G + offs_g
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blk = tl.load(BT + b * s_btb + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
        off = blk * s_kb + (offs_n % BS) * s_kt + h * s_kh
        k = tl.load(K + off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale      # [G_PAD, BLOCK_N], log2 units
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(V + off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    gmask = offs_g < G
    tl.store(O + b * s_ob + s * s_os + heads[:, None] * s_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=gmask[:, None])
    if SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(LSE + b * s_lb + s * s_ls + heads, lse, mask=gmask)
        if MERGE:
            _merge_if_last(O, LSE, OUT, LOCK + b * tl.num_programs(1) + h, b, heads, gmask, offs_d,
                           s_ob, s_os, s_oh, s_lb, s_ls, s_fb, s_fh, G_PAD, D, SPLITS)


@triton.jit
def _merge_if_last(O, LSE, OUT, lock, b, heads, gmask, offs_d, s_ob, s_os, s_oh, s_lb, s_ls, s_fb, s_fh,
                   G_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
    """The split merge in the decode kernel itself (no second launch): each split's program counts
    itself in at ``lock`` once its partial result is stored; the last one to arrive merges every
    split of this (sequence, KV head) and resets the counter for the next launch."""
    tl.debug_barrier()                                    # this program's stores are all issued
    arrived = tl.atomic_add(lock, 1, sem="acq_rel")       # release ours, acquire the others'
    if arrived == SPLITS - 1:
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        for s2 in tl.static_range(SPLITS):
            lse = tl.load(LSE + b * s_lb + s2 * s_ls + heads, mask=gmask, other=float("-inf"), cache_modifier=".cg")
            m = tl.maximum(m, lse)
        acc = tl.zeros([G_PAD, D], tl.float32)
        den = tl.zeros([G_PAD], tl.float32)
        for s2 in tl.static_range(SPLITS):
            lse = tl.load(LSE + b * s_lb + s2 * s_ls + heads, mask=gmask, other=float("-inf"), cache_modifier=".cg")
            w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
            part = tl.load(O + b * s_ob + s2 * s_os + heads[:, None] * s_oh + offs_d[None, :], mask=gmask[:, None],
                           other=0.0, cache_modifier=".cg")
            acc += part * w[:, None]
            den += w
        out = acc / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(OUT + b * s_fb + heads[:, None] * s_fh + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=gmask[:, None])
        tl.atomic_xchg(lock, 0)


@triton.jit
def _merge_kernel(OP, LSE, O, s_pb, s_ps, s_ph, s_lb, s_ls, s_ob, s_oh,
                  SPLITS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    lse = tl.load(LSE + b * s_lb + offs_s * s_ls + h)                    # [SPLITS]
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
    parts = tl.load(OP + b * s_pb + offs_s[:, None] * s_ps + h * s_ph + offs_d[None, :]).to(tl.float32)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * s_ob + h * s_oh + offs_d, out.to(O.dtype.element_ty))


def _prec(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def decode_splits(batch: int, n_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Split-K factor: enough programs to cover the SMs twice, each >= 256 keys."""
    if batch == 0 or batch * n_kv_heads >= num_sms:
        return 1
    want = triton.cdiv(2 * num_sms, batch * n_kv_heads)
    cap = max(1, max_context // 256)
    return int(min(triton.next_power_of_2(want), triton.next_power_of_2(cap), 32))


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, splits: int = 1,
                 block_n: int = 64, locks: torch.Tensor | None = None):
    """q [B, Hq, D] -> [B, Hq, D]. With ``splits`` > 1 the partial results are merged by a second
    kernel, or, given ``locks`` (int32 zeros, >= B * Hkv, kept between calls: each call leaves them
    zero), by the last split's program of the decode kernel itself."""
    b, hq, d = q.shape
    _, bs, hk, _ = k_cache.shape
    g = hq // hk
    out = torch.empty_like(q)
    pdl = use_pdl(q)
    if splits > 1:
        part = torch.empty(b, splits, hq, d, device=q.device, dtype=torch.float32)
        lse = torch.empty(b, splits, hq, device=q.device, dtype=torch.float32)
        o, s_ob, s_os, s_oh = part, part.stride(0), part.stride(1), part.stride(2)
    else:
        lse = out  # unused
        o, s_ob, s_os, s_oh = out, out.stride(0), 0, out.stride(1)
    merge = splits > 1 and locks is not None
    if merge:
        assert locks.dtype == torch.int32 and locks.numel() >= b * hk
    _decode_kernel[(b, hk, splits)](
        q, k_cache, v_cache, block_tables, context_lens, o, lse, out, locks if merge else out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), s_ob, s_os, s_oh,
        lse.stride(0) if splits > 1 else 0, lse.stride(1) if splits > 1 else 0, out.stride(0), out.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=bs, BLOCK_N=block_n, SPLITS=splits, PREC=_prec(q),
        PDL=pdl, MERGE=merge, num_warps=4, num_stages=2, launch_pdl=pdl)
    if splits > 1 and not merge:
        _merge_kernel[(b, hq)](part, lse, out, part.stride(0), part.stride(1), part.stride(2),
                               lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                               SPLITS=splits, D=d, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


@triton.jit
def _prefill_kernel(Q, K, V, BT, CL, CU, QB, O, qk_scale,
                    s_qt, s_qh, s_kb, s_kt, s_kh, s_btb, s_ot, s_oh,
                    G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, FLAT: tl.constexpr):
    if FLAT:                                   # grid (len(QB), heads): QB[p] = sequence << 16 | query block, or -1
        code = tl.load(QB + tl.program_id(0))
        if code < 0:
            return
        i = code >> 16
        mb = code & 0xFFFF
        hq = tl.program_id(1)
    else:                                      # grid (query blocks of the longest, sequences, heads)
        mb = tl.program_id(0)
        i = tl.program_id(1)
        hq = tl.program_id(2)
    hk = hq // G
    q0 = tl.load(CU + i)
    qlen = tl.load(CU + i + 1) - q0
    if mb * BLOCK_M >= qlen:
        return
    ctx = tl.load(CL + i)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < qlen
    pos_m = ctx - qlen + offs_m                                          # absolute positions
    q = tl.load(Q + (q0 + offs_m)[:, None] * s_qt + hq * s_qh + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    end = tl.minimum(ctx, ctx - qlen + (mb + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blk = tl.load(BT + i * s_btb + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
        off = blk * s_kb + (offs_n % BS) * s_kt + hk * s_kh
        k = tl.load(K + off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        causal = (offs_n[None, :] <= pos_m[:, None]) & mask_n[None, :]
        qk = tl.where(causal, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(V + off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + (q0 + offs_m)[:, None] * s_ot + hq * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mask_m[:, None])


def paged_prefill(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_query_len, scale,
                  q_blocks: torch.Tensor | None = None):
    """q [N, Hq, D] (chunks of len(context_lens) sequences, offsets cu_seqlens_q) -> [N, Hq, D].
    ``q_blocks`` (int32, sequence << 16 | query block per program, -1 for none): a flat grid over
    the query blocks that exist, for CUDA graphs, whose grid is fixed: without it a graph's grid
    is (its token bucket's blocks x its most sequences), almost all of it programs that exit."""
    n, hq, d = q.shape
    _, bs, hk, _ = k_cache.shape
    out = torch.empty_like(q)
    block_m = prefill_block_m(d)
    block_n = 64
    flat = q_blocks is not None
    grid = (q_blocks.shape[0], hq) if flat else (triton.cdiv(max_query_len, block_m), context_lens.shape[0], hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, q_blocks if flat else cu_seqlens_q, out,
        scale * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=hq // hk, D=d, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n, PREC=_prec(q), FLAT=flat,
        num_warps=4, num_stages=2)
    return out


@triton.jit
def _store_kv_kernel(K, V, KC, VC, SLOT, s_kn, s_kh, s_vn, s_vh, s_cs, s_ch,
                     D: tl.constexpr, HD: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(SLOT + i).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HD
    h, d = offs // D, offs % D
    k = tl.load(K + i * s_kn + h * s_kh + d, mask=mask)
    v = tl.load(V + i * s_vn + h * s_vh + d, mask=mask)
    tl.store(KC + slot * s_cs + h * s_ch + d, k, mask=mask)
    tl.store(VC + slot * s_cs + h * s_ch + d, v, mask=mask)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v [N, Hkv, D] -> cache slots, K and V in one launch."""
    n, hk, d = k.shape
    kc, vc = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
    _store_kv_kernel[(n,)](k, v, kc, vc, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           kc.stride(0), kc.stride(1), D=d, HD=hk * d, BLOCK=triton.next_power_of_2(hk * d),
                           num_warps=4)
