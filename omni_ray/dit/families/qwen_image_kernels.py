"""Qwen-Image's joint attention inputs in one Triton kernel per stream (CUDA):

    a stream's fused projection [B, n, 3, H, d]  ->  q, k, v of the joint sequence [3, B, T + N, H, d]
                                                     (text at 0.., image at T..; or, ``image_first``, image
                                                     at 0.., text at N..; q / k RMS-normed + rotated)

It replaces what the block's compiled helpers ran on a step of 8 concurrent 512 px requests (H100): the q / k
RMS norm + RoPE as an Inductor reduction, a second pass for their joint concatenation, and ``torch.cat`` of v
as a strided copy: 14% of the step, at ~0.6-0.7 TB/s (docs/benchmarks.md, Qwen-Image). One program per
(token, batch row) reads the token's q, k and v once and writes them once, in place in the joint tensors.

Numerics follow ``qwen_image_block.qk_norm_rope`` (diffusers' RMSNorm, then the RoPE): the mean of squares in
fp32, the normalized row rounded to the activation dtype before the weight, the weight product rounded, the
rotation in fp32, one rounding at the end. The weights must be in the activations' dtype (or absent);
``applies`` says when the kernel takes a call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope(x, W, eps, cos, sin, BH: tl.constexpr, D: tl.constexpr, HAS_W: tl.constexpr, OUT: tl.constexpr):
    """x [BH, D] fp32 -> RMS-normed (times W), rotated pairs (2i, 2i + 1) by cos / sin [1, D/2]; in OUT."""
    r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
    h = (x * r).to(OUT)
    if HAS_W:
        w = tl.load(W + tl.arange(0, D))[None, :]
        h = (h.to(tl.float32) * w.to(tl.float32)).to(OUT)
    x0, x1 = tl.split(tl.reshape(h.to(tl.float32), [BH, D // 2, 2]))
    o = tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos)
    return tl.reshape(o, [BH, D]).to(OUT)


@triton.jit
def _joint_qkv_kernel(SRC, s_b, s_t, QW, KW, COS, SIN, OUT, o_3, o_b, offset, q_eps, k_eps,
                      H: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, HAS_W: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)          # a token of this stream (64-bit offsets: large batches of big
    b = tl.program_id(1).to(tl.int64)          # images pass 2^31 elements); a batch row
    rows = tl.arange(0, BH)[:, None]           # heads (padded to a power of two)
    cols = tl.arange(0, D)[None, :]
    m = rows < H
    half = tl.arange(0, D // 2)[None, :]
    cos = tl.load(COS + t * (D // 2) + half)
    sin = tl.load(SIN + t * (D // 2) + half)
    src = SRC + b * s_b + t * s_t + rows * D + cols          # [q | k | v] heads, each row contiguous
    dst = OUT + b * o_b + (offset + t) * (H * D) + rows * D + cols
    out_t = OUT.dtype.element_ty
    q = tl.load(src, mask=m, other=0.0).to(tl.float32)
    tl.store(dst, _norm_rope(q, QW, q_eps, cos, sin, BH, D, HAS_W, out_t), mask=m)
    k = tl.load(src + H * D, mask=m, other=0.0).to(tl.float32)
    tl.store(dst + o_3, _norm_rope(k, KW, k_eps, cos, sin, BH, D, HAS_W, out_t), mask=m)
    tl.store(dst + 2 * o_3, tl.load(src + 2 * H * D, mask=m), mask=m)


def applies(cqkv: torch.Tensor, qkv: torch.Tensor, attn) -> bool:
    """The kernel's conditions: both streams' projections [B, n, 3, H, d] with contiguous token rows, a
    power-of-two head dim, the four RMS weights all present in the activations' dtype or all absent."""
    weights = [attn.norm_added_q, attn.norm_q, attn.norm_added_k, attn.norm_k]
    ws = [getattr(n, "weight", None) for n in weights]
    same = all(w is None for w in ws) or all(w is not None and w.dtype == qkv.dtype for w in ws)
    d = qkv.shape[-1]
    return (same and cqkv.dtype == qkv.dtype and d & (d - 1) == 0
            and all(t.dim() == 5 and t.stride(-1) == 1 and t.stride(3) == d and t.stride(2) == t.shape[3] * d
                    for t in (cqkv, qkv)))


def joint_qkv(cqkv: torch.Tensor, qkv: torch.Tensor, attn, rope: tuple[torch.Tensor, ...], image_first: bool = False):
    """(q, k, v) of the joint sequence [text | image] (``image_first``: [image | text], the ragged attention's
    layout), each [B, H, T + N, d] (views of one token-major [3, B, T + N, H, d] tensor):
    cqkv [B, T, 3, H, d] the text stream's fused projection, qkv [B, N, 3, H, d] the image stream's;
    ``rope`` = (image cos, image sin, text cos, text sin), each [tokens, d/2] fp32; ``attn`` the
    diffusers attention module (its four RMS norms)."""
    B, T, _, H, d = cqkv.shape
    N = qkv.shape[1]
    out = torch.empty(3, B, T + N, H, d, dtype=qkv.dtype, device=qkv.device)
    img_cos, img_sin, txt_cos, txt_sin = (t.contiguous() for t in rope)
    has_w = attn.norm_q.weight is not None
    bh = triton.next_power_of_2(H)
    txt_at, img_at = (N, 0) if image_first else (0, T)
    for src, n, off, (qn, kn), cos, sin in ((cqkv, T, txt_at, (attn.norm_added_q, attn.norm_added_k), txt_cos, txt_sin),
                                            (qkv, N, img_at, (attn.norm_q, attn.norm_k), img_cos, img_sin)):
        if n == 0:
            continue
        _joint_qkv_kernel[(n, B)](src, src.stride(0), src.stride(1), qn.weight if has_w else src,
                                  kn.weight if has_w else src, cos, sin, out, out.stride(0), out.stride(1), off,
                                  qn.eps, kn.eps, H=H, BH=bh, D=d, HAS_W=has_w, num_warps=4)
    q, k, v = out.transpose(2, 3)              # [B, H, T + N, d] each
    return q, k, v
