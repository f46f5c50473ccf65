"""Ulysses sequence parallel attention: each rank holds a shard of the image tokens with every head;
an all-to-all turns ``[tokens/N, heads]`` into ``[tokens, heads/N]``, attention runs on the full
sequence for the rank's heads, and a second all-to-all turns it back.

Only self-attention over image tokens needs it: PixArt's cross-attention reads the whole caption
on every rank, so its (split) queries attend locally. SD3's joint attention concatenates the
caption to the image tokens; every rank computes the caption's q/k/v for all heads, keeps its own
heads, and all-gathers the caption's output over heads (the caption stream stays whole, and equal,
on every rank).

Qwen-Image's joint attention likewise: each rank rotates its shard's image queries / keys with the
shard's RoPE rows before the all-to-all, and the caption (whole on every rank) takes the rank's heads.

Wan's self-attention over the frame-height-width tokens likewise: q / k are RMS-normed (across all
heads, token-wise) and rotated with the shard's 3-D RoPE rows before the all-to-all; its
cross-attention reads the text (and I2V image) context, whole on every rank, with the local queries.

Shards may differ by one token (``Layout.token_counts``), so the all-to-alls take split sizes.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F


class SPGroup:
    """The sequence-parallel group of one rank and the token split of the current forward."""

    def __init__(self, group, size: int, index: int):
        self.group, self.size, self.index = group, size, index
        self.counts: list[int] = []        # tokens per shard in this forward
        self.active = False                # False: attention runs locally on whole sequences

    def set_tokens(self, counts: list[int] | None) -> None:
        self.counts = counts or []
        self.active = counts is not None and self.size > 1

    # ------------------------------------------------------------------ the two all-to-alls
    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, n, G, H, d] (local tokens, all heads; G tensors such as q/k/v) ->
        [N, B, G, H/S, d] (all tokens, this rank's heads)."""
        B, n, G, H, d = x.shape
        S, h = self.size, H // self.size
        send = x.reshape(B, n, G, S, h, d).permute(3, 1, 0, 2, 4, 5).reshape(S * n, B, G, h, d)  # heads block j -> j
        out = x.new_empty(sum(self.counts), B, G, h, d)
        dist.all_to_all_single(out, send.contiguous(), output_split_sizes=self.counts,
                               input_split_sizes=[n] * S, group=self.group)
        return out

    def heads_to_seq(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, H/S, N, d] (all tokens, this rank's heads) -> [B, n, H*d] (local tokens, all heads)."""
        B, h, N, d = o.shape
        S, n = self.size, self.counts[self.index]
        out = o.new_empty(S * n, B, h, d)
        dist.all_to_all_single(out, o.permute(2, 0, 1, 3).contiguous(), output_split_sizes=[n] * S,
                               input_split_sizes=self.counts, group=self.group)
        return out.view(S, n, B, h, d).permute(2, 1, 0, 3, 4).reshape(B, n, S * h * d)

    def gather_heads(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, H/S, T, d] -> [B, H, T, d]: every rank's heads of a sequence all ranks hold whole."""
        parts = [torch.empty_like(o) for _ in range(self.size)]
        dist.all_gather(parts, o.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def my_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """x [B, T, H*d] -> [B, H/S, T, d]: this rank's heads."""
        B, T, _ = x.shape
        h = heads // self.size
        return x.view(B, T, heads, -1)[:, :, self.index * h:(self.index + 1) * h].transpose(1, 2)


# ----------------------------------------------------------------------------- PixArt (fast block hook)
def ulysses_self_attention(sp: SPGroup, qkv: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``pixart_block.sdpa_self_attention``: qkv [B, n, 3, H, d] -> [B, n, H*d]."""
    if not sp.active:
        from omni_ray.dit.families.pixart_block import sdpa_self_attention
        return sdpa_self_attention(qkv)
    q, k, v = sp.seq_to_heads(qkv).permute(2, 1, 3, 0, 4)               # each [B, H/S, N, d]
    return sp.heads_to_seq(F.scaled_dot_product_attention(q, k, v))


def install_pixart(family, sp: SPGroup) -> None:
    for f in family.block_fns:
        f.self_attention = partial(ulysses_self_attention, sp)


# ----------------------------------------------------------------------------- SD3 (attention processor)
class UlyssesJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` with the image tokens sequence-parallel (also serves
    the image-only ``attn2`` of SD3.5's dual-attention blocks)."""

    def __init__(self, sp: SPGroup, local):
        self.sp, self.local = sp, local     # local: the original processor (used while inactive)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        sp = self.sp
        if not sp.active:
            return self.local(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        B, n, _ = hidden_states.shape
        H = attn.heads
        q, k, v = (proj(hidden_states).view(B, n, H, -1) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:                                      # per-head norms: before the split
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q, k, v = sp.seq_to_heads(torch.stack([q, k, v], dim=2)).permute(2, 1, 3, 0, 4)   # [B, H/S, N, d]
        N = q.shape[2]
        ctx = encoder_hidden_states
        if ctx is not None:
            cq, ck, cv = (sp.my_heads(p(ctx), H) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)   # [B, H/S, N(+T), d]
        out = attn.to_out[1](attn.to_out[0](sp.heads_to_seq(o[:, :, :N]).to(q.dtype)))
        if ctx is None:
            return out
        c = sp.gather_heads(o[:, :, N:])                                  # [B, H, T, d]
        c = c.transpose(1, 2).reshape(B, c.shape[2], -1).to(q.dtype)
        if not attn.context_pre_only:
            c = attn.to_add_out(c)
        return out, c


def install_sd3(family, sp: SPGroup) -> None:
    for blk in family.blocks:
        for attn in (blk.attn, getattr(blk, "attn2", None)):
            if attn is not None:
                attn.set_processor(UlyssesJointAttnProcessor(sp, attn.processor))


# ----------------------------------------------------------------------------- Qwen-Image (block hook)
def ulysses_qwen_attention(sp: SPGroup, attn, qkv: torch.Tensor, cqkv: torch.Tensor, ctx_bias: torch.Tensor | None,
                           rope: tuple[torch.Tensor, ...], qk_norm_rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image's joint attention with the image tokens sequence-parallel: qkv [B, n, 3, H, d] of this
    rank's image shard (``rope``'s image rows are the shard's), cqkv [B, T, 3, H, d] of the whole caption
    (equal on every rank); ``qk_norm_rope(x, weight, eps, cos, sin)`` is the family's q / k norm + RoPE.
    Returns (image output [B, n, H*d], caption output [B, T, H*d])."""

    img_cos, img_sin, txt_cos, txt_sin = rope
    H = qkv.shape[3]
    q = qk_norm_rope(qkv[:, :, 0], attn.norm_q.weight, attn.norm_q.eps, img_cos, img_sin)
    k = qk_norm_rope(qkv[:, :, 1], attn.norm_k.weight, attn.norm_k.eps, img_cos, img_sin)
    q, k, v = sp.seq_to_heads(torch.stack([q, k, qkv[:, :, 2]], dim=2)).permute(2, 1, 3, 0, 4)  # [B, H/S, N, d]
    h = H // sp.size
    mine = slice(sp.index * h, (sp.index + 1) * h)
    cq = qk_norm_rope(cqkv[:, :, 0, mine], attn.norm_added_q.weight, attn.norm_added_q.eps, txt_cos, txt_sin)
    ck = qk_norm_rope(cqkv[:, :, 1, mine], attn.norm_added_k.weight, attn.norm_added_k.eps, txt_cos, txt_sin)
    cv = cqkv[:, :, 2, mine]
    T, N = cqkv.shape[1], q.shape[2]
    q = torch.cat([cq.transpose(1, 2), q], dim=2)                                   # [B, H/S, T + N, d]
    k = torch.cat([ck.transpose(1, 2), k], dim=2)
    v = torch.cat([cv.transpose(1, 2), v], dim=2)
    mask = None if ctx_bias is None else F.pad(ctx_bias, (0, N))[:, None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    img = sp.heads_to_seq(o[:, :, T:])
    c = sp.gather_heads(o[:, :, :T])                                                # [B, H, T, d]
    return img.to(qkv.dtype), c.transpose(1, 2).reshape(c.shape[0], T, -1).to(qkv.dtype)


def install_qwen_image(family, sp: SPGroup) -> None:
    family.sp = sp
    for f in family.block_fns:
        f.sp = sp


# ----------------------------------------------------------------------------- Wan (block hook)
def ulysses_wan_attention(sp: SPGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``wan_block.attention`` on a token shard: q, k, v [B, n, H, d] (q / k already normed
    and rotated with the shard's RoPE rows) -> [B, n, H*d]."""
    from omni_ray.dit.families.wan_block import attention

    if not sp.active:
        return attention(q, k, v)
    q, k, v = sp.seq_to_heads(torch.stack([q, k, v], dim=2)).permute(2, 1, 3, 0, 4)     # each [B, H/S, N, d]
    return sp.heads_to_seq(F.scaled_dot_product_attention(q, k, v)).type_as(q)


def install_wan(family, sp: SPGroup) -> None:
    """Every expert's blocks (Wan2.2: both), and the family's RoPE rows and SDPA measurement."""
    family.sp = sp
    family.sdpa.heads = family.sdpa.heads // sp.size          # each rank attends with H/S heads
    for fns in family.expert_fns:
        for f in fns:
            f.self_attention = partial(ulysses_wan_attention, sp)


def install(family, sp: SPGroup) -> None:
    """Route the family's image self-attention through Ulysses (a no-op while ``sp`` is inactive)."""
    name = type(family).__name__
    if name == "PixArtFamily":
        install_pixart(family, sp)
    elif name == "SD3Family":
        install_sd3(family, sp)
    elif name in ("QwenImageFamily", "QwenImageEditFamily"):
        install_qwen_image(family, sp)
    elif name in ("WanFamily", "WanI2VFamily", "WanTI2VFamily"):
        install_wan(family, sp)
    else:
        from omni_ray.errors import ConfigError
        raise ConfigError(f"sequence parallel is not implemented for {name}")
