"""A lean forward for diffusers' ``WanTransformerBlock``, in fewer kernels than the diffusers block.

The same math as the block and its ``WanAttnProcessor`` (fp32 layer norms and modulation, fp32 gated residuals,
RMS norm of q / k across heads, Wan's interleaved RoPE in fp32): one fused q/k/v projection for self-attention
and one k/v projection for the cross-attention (the block's own linears become views into the fused weights, so
nothing is stored twice and the diffusers module still runs unchanged), RoPE on precomputed half-width cos / sin
written as one ``stack`` instead of diffusers' strided stores, and ``fuse_elementwise()`` compiles the small
helpers (layer norm + modulation, the cross-attention's fp32 layer norm, RMS norm + RoPE, gated residual) into
fused kernels without compiling the GEMMs or the attention; with ``norm_kernels`` on, self-attention's q and k
(norm + RoPE) and the layer norm + modulation are Triton kernels (``wan_kernels.py``,
``ln_modulate_kernel.py``). Video tokens make every elementwise pass over ``[rows, 14k-33k, D]`` in fp32 cost
real bandwidth: fusing them matters. The feed-forward's GELU stays a kernel of its own: in cuBLASLt's epilogue
(as the Qwen-Image block runs it) the 14B shape's first GEMM lost more time than the GELU pass costs
(docs/benchmarks.md, Wan).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni_ray.dit.families.optional_kernel import OptionalKernel
from omni_ray.dit.families.pixart_block import _fuse


def modulate(x: torch.Tensor, eps: float, scale1: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(LayerNorm(x) in fp32 * scale1 + shift) in x's dtype; scale1 / shift [B, 1, D] fp32."""
    return (F.layer_norm(x.float(), x.shape[-1:], None, None, eps) * scale1 + shift).type_as(x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """diffusers' ``FP32LayerNorm`` (the cross-attention's ``norm2``): LayerNorm in fp32, back in x's dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).type_as(x)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(x + y * gate) in fp32, back in x's dtype (the block's residuals)."""
    return (x.float() + y.float() * gate).type_as(x)


def rms_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, cos: torch.Tensor | None,
             sin: torch.Tensor | None) -> torch.Tensor:
    """RMS norm over all heads (diffusers' ``rms_norm_across_heads``), then Wan's RoPE (pairs (2i, 2i+1)
    rotated by cos / sin [N, d/2] fp32) when given: x [B, N, H*d] -> [B, N, H, d]."""
    h = F.rms_norm(x, x.shape[-1:], weight, eps).unflatten(2, (heads, -1))
    if cos is None:
        return h
    x1, x2 = h.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(h)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, N, H, d] x 3 -> [B, N, H*d] (SDPA, no mask: Wan attends to every token)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).flatten(2).type_as(q)


def per_segment(v: torch.Tensor, plain_dim: int) -> tuple[torch.Tensor, ...]:
    """A row conditioning with a token-segment axis ([B, S, ...], per-token timesteps) -> its S parts;
    one without (``plain_dim`` dims) -> (v,)."""
    return v.unbind(1) if v.dim() > plain_dim else (v,)


def segments(xs: torch.Tensor | tuple, head: int, parts: tuple, fn) -> torch.Tensor:
    """``fn(*tokens, part)`` with ``parts[0]`` on the first ``head`` tokens of each of ``xs`` [B, n, *] and
    ``parts[-1]`` on the others (Wan2.2 TI2V's per-token timesteps: the first latent frame, the rest); one
    part, or tokens wholly on one side: one call, no copy."""
    xs = xs if isinstance(xs, tuple) else (xs,)
    if len(parts) == 1 or head <= 0:
        return fn(*xs, parts[-1])
    if head >= xs[0].shape[1]:
        return fn(*xs, parts[0])
    return torch.cat([fn(*(x[:, :head] for x in xs), parts[0]), fn(*(x[:, head:] for x in xs), parts[-1])], dim=1)


class Kernels:
    """The elementwise helpers a block calls: eager, or compiled into fused kernels."""

    def __init__(self):
        self.modulate, self.gated_residual, self.rms_rope = modulate, gated_residual, rms_rope
        self.layer_norm = layer_norm
        # DiTEngineConfig.norm_kernels: the norms as Triton kernels (wan_kernels.py, ln_modulate_kernel.py) when fused
        self.use_norm_kernels = False
        self.qk_kernel = OptionalKernel("Wan self-attention q/k")
        self.ln_kernel = OptionalKernel("Wan layer norm + modulation", applies="ln_modulate_applies")

    def fuse(self) -> None:
        self.modulate = torch.compile(modulate)
        self.layer_norm = torch.compile(layer_norm)
        self.gated_residual = torch.compile(gated_residual)
        self.rms_rope = torch.compile(rms_rope)
        if self.use_norm_kernels:           # Triton: imported when used; the compiled helpers where they do not apply
            import omni_ray.dit.families.ln_modulate_kernel as ln_modulate_kernel
            import omni_ray.dit.families.wan_kernels as wan_kernels

            self.qk_kernel.module, self.ln_kernel.module = wan_kernels, ln_modulate_kernel
            self.modulate = self._modulate_kernel(self.modulate)
            self.layer_norm = self._layer_norm_kernel(self.layer_norm)

    def _modulate_kernel(self, compiled):
        def modulate_(x, eps, scale1, shift):
            out = self.ln_kernel.call((x, scale1, shift), "ln_modulate", x, eps, scale1, shift)
            return compiled(x, eps, scale1, shift) if out is None else out
        return modulate_

    def _layer_norm_kernel(self, compiled):
        def layer_norm_(x, weight, bias, eps):       # LayerNorm(x) * weight + bias: the modulation kernel's math
            if weight is not None and bias is not None:  # (the kernel reads them in fp32: no cast per call)
                w, b = weight.view(1, 1, -1), bias.view(1, 1, -1)
                out = self.ln_kernel.call((x, w, b), "ln_modulate", x, eps, w, b)
                if out is not None:
                    return out
            return compiled(x, weight, bias, eps)
        return layer_norm_

    def self_qk(self, qkv: torch.Tensor, attn: nn.Module, heads: int, cos: torch.Tensor, sin: torch.Tensor):
        """Self-attention's q, k [B, N, H, d] from the fused projection qkv [B, N, 3 * H * d]: RMS norm
        across heads, then RoPE (the Triton kernel on CUDA when fused, else ``rms_rope`` twice)."""
        qk = self.qk_kernel.call((qkv, attn.norm_q, attn.norm_k, cos), "qk_rms_rope", qkv, attn.norm_q,
                                 attn.norm_k, heads, cos, sin)
        if qk is not None:
            return qk
        q, k, _ = qkv.chunk(3, dim=-1)
        return (self.rms_rope(q, attn.norm_q.weight, attn.norm_q.eps, heads, cos, sin),
                self.rms_rope(k, attn.norm_k.weight, attn.norm_k.eps, heads, cos, sin))


class DiffusersBlock(nn.Module):
    """A block ``WanBlock`` does not cover, run as diffusers runs it (same call as ``WanBlock``; per-token
    timesteps expanded to diffusers' [B, n, 6, D])."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, ctx, temb, rope, head: int = 0):
        if temb.dim() == 4:
            n = x.shape[1]
            temb = torch.cat([temb[:, :1].expand(-1, min(head, n), -1, -1),
                              temb[:, -1:].expand(-1, n - min(head, n), -1, -1)], dim=1)
        return self.block(x, ctx, temb, rope[2:])


def supported(block: nn.Module) -> bool:
    a1, a2 = block.attn1, block.attn2
    return (isinstance(a1.norm_q, nn.RMSNorm) and isinstance(a2.norm_q, nn.RMSNorm)
            and not getattr(a1, "fused_projections", False) and not getattr(a2, "fused_projections", False)
            and type(block.ffn.net[0]).__name__ == "GELU" and block.ffn.net[0].approximate == "tanh")


class WanBlock(nn.Module):
    """``WanBlock(block, kernels)(x, ctx, temb, rope, head=0) -> x``: temb [B, 6, D] (the block's timestep
    projection; per-token timesteps: [B, 2, 6, D], the first for the first ``head`` tokens, the second for
    the rest), ctx [B, T_img + 512, D] (projected image states first on I2V), rope = (cos, sin)
    [N, d/2] fp32, then diffusers' full tables (unused here). Sequence parallel: x holds this rank's
    token shard and cos / sin its rows; only self-attention needs the other shards (Ulysses), the
    cross-attention reads the whole (replicated) context and the rest is token-wise."""

    def __init__(self, block: nn.Module, kernels: Kernels):
        super().__init__()
        self.block, self.k = block, kernels
        a1, a2 = block.attn1, block.attn2
        self.heads = a1.heads
        self.qkv_w, self.qkv_b = _fuse([a1.to_q, a1.to_k, a1.to_v])
        self.kv_w, self.kv_b = _fuse([a2.to_k, a2.to_v])
        self.img = a2.add_k_proj is not None
        self.self_attention = attention     # sequence parallel swaps in Ulysses (parallel/ulysses.py)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], head: int = 0) -> torch.Tensor:
        blk, k = self.block, self.k
        a1, a2, H = blk.attn1, blk.attn2, self.heads
        # per segment: (shift, 1 + scale, gate) of self-attention, then of the feed-forward, [B, 1, D] fp32
        mods = [(m[0], 1 + m[1], m[2], m[3], 1 + m[4], m[5])
                for m in ((blk.scale_shift_table + te.float()).chunk(6, dim=1) for te in per_segment(temb, 3))]
        cos, sin = rope[:2]

        def modulated(x, eps, i):          # LayerNorm(x) * (1 + scale) + shift: i = 0 (attention), 3 (MLP)
            return segments(x, head, mods, lambda xs, m: k.modulate(xs, eps, m[i + 1], m[i]))

        def gated(x, y, i):                 # x + y * gate: i = 2 (attention), 5 (MLP)
            return segments((x, y), head, mods, lambda xs, ys, m: k.gated_residual(xs, ys, m[i]))

        # self-attention
        h = modulated(x, blk.norm1.eps, 0)
        qkv = F.linear(h, self.qkv_w, self.qkv_b)
        q, kk = k.self_qk(qkv, a1, H, cos, sin)
        v = qkv[..., 2 * qkv.shape[-1] // 3:].unflatten(2, (H, -1))
        x = gated(x, a1.to_out[0](self.self_attention(q, kk, v)), 2)

        # cross-attention (text; I2V: the image states too, through their own k / v)
        n2 = blk.norm2
        h = k.layer_norm(x, n2.weight, n2.bias, n2.eps) if isinstance(n2, nn.LayerNorm) else x
        img_len = ctx.shape[1] - 512 if self.img else 0
        q = k.rms_rope(a2.to_q(h), a2.norm_q.weight, a2.norm_q.eps, H, None, None)
        ck, cv = F.linear(ctx[:, img_len:], self.kv_w, self.kv_b).chunk(2, dim=-1)
        o = attention(q, k.rms_rope(ck, a2.norm_k.weight, a2.norm_k.eps, H, None, None), cv.unflatten(2, (H, -1)))
        if self.img:
            c_img = ctx[:, :img_len]
            ik = a2.add_k_proj(c_img)
            ik = F.rms_norm(ik, ik.shape[-1:], a2.norm_added_k.weight, a2.norm_added_k.eps)
            o = o + attention(q, ik.unflatten(2, (H, -1)), a2.add_v_proj(c_img).unflatten(2, (H, -1)))
        x = x + a2.to_out[0](o)

        # feed-forward
        return gated(x, blk.ffn(modulated(x, blk.norm3.eps, 3)), 5)      # GELU: its own kernel (module docstring)
