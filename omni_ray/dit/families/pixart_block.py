"""A lean forward for diffusers' PixArt ``BasicTransformerBlock`` (``norm_type="ada_norm_single"``).

The same math as the diffusers block, in fewer kernels: fused QKV (self-attention) and KV
(cross-attention) projections, ``addcmul`` for modulation and gated residuals, SDPA on strided
views. The fused weights are built once and the block's own ``to_q``/``to_k``/``to_v`` become
views into them, so no weight is stored twice and the diffusers module still runs unchanged.
Blocks this does not cover (qk-norm, other activations, ...) fall back to the module's forward.

The per-row modulations (``[B, 1, D]`` broadcast over tokens) run as slow broadcast kernels in
eager PyTorch; ``fuse_elementwise()`` compiles the two small helpers below into fused kernels
(layer norm + modulation, gated residual) without compiling the whole block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the linears' weights (and biases) and re-point each linear at its slice."""
    w = torch.cat([m.weight.data for m in linears])
    b = torch.cat([m.bias.data for m in linears]) if all(m.bias is not None for m in linears) else None
    off = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w[off:off + n], requires_grad=False)
        if b is not None:
            m.bias = nn.Parameter(b[off:off + n], requires_grad=False)
        off += n
    return w, b


def ln_modulate(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                scale1: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * scale1 + shift; x [B, N, D] contiguous, scale1 / shift [B, 1, D]."""
    h = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return h.mul_(scale1).add_(shift)


def sdpa_self_attention(qkv: torch.Tensor) -> torch.Tensor:
    """qkv [B, N, 3, H, d] -> attention output [B, N, H*d] (sequence parallel swaps this for Ulysses)."""
    B, N = qkv.shape[:2]
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y (x first: the output keeps x's contiguous layout)."""
    return torch.addcmul(x, gate, y)


class Kernels:
    """The elementwise helpers a block calls: eager, or compiled into fused kernels."""

    def __init__(self):
        self.ln_modulate, self.gated_add = ln_modulate, gated_add

    def fuse(self) -> None:
        # automatic dynamic shapes: sizes that vary (rows, tokens) become symbolic after a
        # recompile, the hidden size stays static (better reduction kernels)
        self.ln_modulate = torch.compile(ln_modulate)
        self.gated_add = torch.compile(gated_add)


def supported(block: nn.Module) -> bool:
    a1, a2 = block.attn1, block.attn2
    ff0 = block.ff.net[0]
    plain = all(a is not None and a.norm_q is None and a.norm_k is None and not a.residual_connection
                and a.rescale_output_factor == 1.0 and a.group_norm is None and a.spatial_norm is None
                and not a.norm_cross for a in (a1, a2))
    return (plain and block.norm_type == "ada_norm_single" and block.pos_embed is None
            and not block.only_cross_attention and type(ff0).__name__ == "GELU" and block._chunk_size is None)


class PixArtBlock:
    """Callable wrapper: ``PixArtBlock(block)(x, ctx, ctx_bias, temb) -> x``."""

    def __init__(self, block: nn.Module, kernels: Kernels):
        self.block = block
        self.k = kernels
        self.fast = supported(block)
        self.self_attention = sdpa_self_attention
        if self.fast:
            a1, a2 = block.attn1, block.attn2
            self.qkv_w, self.qkv_b = _fuse([a1.to_q, a1.to_k, a1.to_v])
            self.kv_w, self.kv_b = _fuse([a2.to_k, a2.to_v])
            self.heads1, self.heads2 = a1.heads, a2.heads

    def __call__(self, x: torch.Tensor, ctx: torch.Tensor, ctx_bias: torch.Tensor | None,
                 temb: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self.block(x, attention_mask=None, encoder_hidden_states=ctx, encoder_attention_mask=ctx_bias,
                              timestep=temb)
        return self.forward(x, ctx, ctx_bias, temb)

    def forward(self, x, ctx, ctx_bias, temb):
        blk, k = self.block, self.k
        B, N, D = x.shape
        mod = blk.scale_shift_table[None] + temb.reshape(B, 6, -1)                # [B, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)

        # self-attention
        n1, n2 = blk.norm1, blk.norm2
        h = k.ln_modulate(x, n1.weight, n1.bias, n1.eps, 1 + scale_msa, shift_msa)
        qkv = F.linear(h, self.qkv_w, self.qkv_b).view(B, N, 3, self.heads1, -1)
        o = blk.attn1.to_out[0](self.self_attention(qkv))                         # [B, N, D]
        x = k.gated_add(x, gate_msa, o)

        # cross-attention over the caption (no norm before it in PixArt)
        T = ctx.shape[1]
        q = blk.attn2.to_q(x).view(B, N, self.heads2, -1).transpose(1, 2)
        kv = F.linear(ctx, self.kv_w, self.kv_b).view(B, T, 2, self.heads2, -1).permute(2, 0, 3, 1, 4)
        mask = None if ctx_bias is None else ctx_bias[:, None]                     # [B, 1, 1, T]
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        x = x + blk.attn2.to_out[0](o.transpose(1, 2).reshape(B, N, D))

        # feed-forward
        h = k.ln_modulate(x, n2.weight, n2.bias, n2.eps, 1 + scale_mlp, shift_mlp)
        ff0 = blk.ff.net[0]
        h = F.gelu(ff0.proj(h), approximate=ff0.approximate)
        return k.gated_add(x, gate_mlp, blk.ff.net[2](h))
