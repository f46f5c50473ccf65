"""Paged attention over the block-table KV cache.

Cache layout per layer: ``k_cache, v_cache: [num_blocks, block_size, n_kv_heads, head_dim]``.
A step's tokens are ordered decodes first (one query token each) then prefill chunks; every
row's K/V are written to the cache first (``slot_mapping``), then attention reads K/V through
the block tables. Backends, picked once per engine:

* ``flash``:  flash-attn's paged kernels, when the package is installed;
* ``triton``: omni-ray's Triton kernels (``ar/kernels/triton_attention.py``), on CUDA otherwise;
* ``torch``:  plain PyTorch on the same layout (CPU, and the reference in tests).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor          # [N] int64: cache slot of each new token
    context_lens: torch.Tensor          # [B] int32: KV length (cached + new) per sequence
    block_tables: torch.Tensor          # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor          # [B + 1] int32 over this step's tokens
    num_decodes: int = 0                # sequences (= tokens) at the front with one query token
    max_query_len: int = 1
    max_context_len: int = 1
    q_lens: list[int] = field(default_factory=list)     # host copies (torch backend)
    ctx_lens: list[int] = field(default_factory=list)
    decode_splits: int = 1              # split-K factor of the Triton decode kernel
    decode_locks: torch.Tensor | None = None   # int32 zeros [>= B * Hkv]: merge splits in-kernel
    q_blocks: torch.Tensor | None = None       # int32 [P]: the prefill kernel's flat grid (worker/mixed_graphs.py)


def pick_backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "torch"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash"
    return "triton"


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [N, Hkv, D] -> their slots in the cache."""
    hk, d = k.shape[1], k.shape[2]
    k_cache.view(-1, hk, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, hk, d).index_copy_(0, slot_mapping, v)


# ----------------------------------------------------------------------------- torch backend
def _torch_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    b, hq, d = q.shape
    hk, bs = k_cache.shape[2], k_cache.shape[1]
    max_blocks = -(-int(context_lens.max()) // bs)
    bt = block_tables[:, :max_blocks].long()
    k = k_cache[bt].reshape(b, -1, hk, d)                    # [B, T, Hkv, D]
    v = v_cache[bt].reshape(b, -1, hk, d)
    mask = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]   # [B, T]
    qg = q.view(b, hk, hq // hk, d).float()
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k.float()) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgt,bthd->bhgd", scores.softmax(-1), v.float())
    return out.reshape(b, hq, d).to(q.dtype)


def _torch_prefill(q, k_cache, v_cache, meta: AttnMetadata, scale):
    bs, hk, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    hq = q.shape[1]
    outs, start = [], 0
    for i in range(meta.num_decodes, len(meta.q_lens)):
        qlen, ctx = meta.q_lens[i], meta.ctx_lens[i]
        blocks = meta.block_tables[i, : -(-ctx // bs)].long()
        k = k_cache[blocks].reshape(-1, hk, d)[:ctx]            # [ctx, Hkv, D]
        v = v_cache[blocks].reshape(-1, hk, d)[:ctx]
        qi = q[start:start + qlen]                               # [qlen, Hq, D]
        pos_q = torch.arange(ctx - qlen, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= pos_q[:, None]   # [qlen, ctx]
        o = F.scaled_dot_product_attention(
            qi.transpose(0, 1), k.transpose(0, 1).repeat_interleave(hq // hk, 0),
            v.transpose(0, 1).repeat_interleave(hq // hk, 0), attn_mask=mask, scale=scale)
        outs.append(o.transpose(0, 1))
        start += qlen
    return torch.cat(outs)


# ----------------------------------------------------------------------------- the layer
class Attention(nn.Module):
    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, scale: float, backend: str = "torch"):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.scale = n_heads, n_kv_heads, head_dim, scale
        self.backend = backend
        self.k_cache = self.v_cache = torch.tensor([])   # set by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]; k = v = None when they are already in the cache."""
        if k is not None and self.k_cache.numel():
            if self.backend == "torch":
                store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            else:
                from omni_ray.ar.kernels.triton_attention import store_kv as triton_store_kv
                triton_store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        nd = meta.num_decodes
        n_seqs = meta.context_lens.shape[0]
        if nd == n_seqs:                      # pure decode (CUDA-graph steps): no output copy
            return self._decode(q, meta)
        if self.backend == "triton":
            # prompts (and decodes, query length 1) in one prefill-kernel launch over whole, fresh
            # tensors: no views at offset nd, whose alignment and strides vary step to step and
            # would make Triton compile new kernel variants in the middle of serving (~1 s each)
            from omni_ray.ar.kernels.triton_attention import paged_prefill
            return paged_prefill(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                 meta.cu_seqlens_q, meta.max_query_len, self.scale, meta.q_blocks)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], meta)
        if n_seqs > nd:
            out[nd:] = self._prefill(q[nd:], meta)
        return out

    def _decode(self, q, meta):
        nd = meta.num_decodes
        bt, cl = meta.block_tables[:nd], meta.context_lens[:nd]
        if self.backend == "triton":
            from omni_ray.ar.kernels.triton_attention import paged_decode
            return paged_decode(q, self.k_cache, self.v_cache, bt, cl, self.scale, meta.decode_splits,
                                locks=meta.decode_locks)
        if self.backend == "flash":
            from flash_attn import flash_attn_with_kvcache
            return flash_attn_with_kvcache(q.unsqueeze(1), self.k_cache, self.v_cache, cache_seqlens=cl,
                                           block_table=bt, softmax_scale=self.scale, causal=True).squeeze(1)
        return _torch_decode(q, self.k_cache, self.v_cache, bt, cl, self.scale)

    def _prefill(self, q, meta):
        nd = meta.num_decodes
        if self.backend == "torch":
            return _torch_prefill(q, self.k_cache, self.v_cache, meta, self.scale)
        cu = meta.cu_seqlens_q[nd:] - meta.cu_seqlens_q[nd]
        bt, cl = meta.block_tables[nd:], meta.context_lens[nd:]
        from flash_attn import flash_attn_varlen_func
        cu_k = F.pad(cl.cumsum(0, dtype=torch.int32), (1, 0))
        return flash_attn_varlen_func(q, self.k_cache, self.v_cache, cu_seqlens_q=cu, cu_seqlens_k=cu_k,
                                      max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_context_len,
                                      softmax_scale=self.scale, causal=True, block_table=bt)
