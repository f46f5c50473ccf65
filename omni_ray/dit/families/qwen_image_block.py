"""A lean forward for diffusers' ``QwenImageTransformerBlock`` (the dual-stream MMDiT block).

The same math as the diffusers block and its ``QwenDoubleStreamAttnProcessor2_0``, in fewer kernels:
one fused q/k/v projection per stream (the block's own linears become views into the fused weight,
so nothing is stored twice and the diffusers module still runs unchanged), RoPE in real arithmetic
on precomputed cos / sin (the complex product of ``apply_rotary_emb_qwen``, written out, in fp32),
``addcmul`` for the gated residuals, one SDPA over [text | image] with an additive caption mask only
when the batch has one (or, where measured faster, the split of ``split_attention.py`` or the ragged
attention of ``ragged_attention.py`` over [image | text]), the MLPs' GELU
in the GEMM epilogue on CUDA, the output projections' biases in the gated residuals.
``fuse_elementwise()`` compiles the small helpers (layer norm + modulation, q/k RMS norm + RoPE + the
joint concatenation, gated residual) into fused kernels without compiling the whole block; fused on
CUDA, the joint q / k / v (both streams' norms, RoPE and the concatenation) come from
one Triton kernel per stream (``qwen_image_kernels.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni_ray.dit.caption_pack import packed
from omni_ray.dit.families.optional_kernel import OptionalKernel
from omni_ray.dit.families.pixart_block import _fuse, gated_add, ln_modulate
from omni_ray.dit.families.ragged_attention import ragged_caption_attention
from omni_ray.dit.families.split_attention import merge, split_caption_attention


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """diffusers' RMSNorm over the head dim, then RoPE: x [B, S, H, d], cos / sin [S, d/2] fp32."""
    h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        if weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(weight.dtype)
        h = h * weight
    else:
        h = h.to(x.dtype)
    out_dtype = h.dtype
    h = h.float()
    x0, x1 = h[..., 0::2], h[..., 1::2]
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(out_dtype)


def joint_qk(txt: torch.Tensor, img: torch.Tensor, w_txt: torch.Tensor | None, w_img: torch.Tensor | None,
             eps_txt: float, eps_img: float, rope: tuple[torch.Tensor, ...], image_first: bool = False) -> torch.Tensor:
    """The joint queries (or keys) [B, T + N, H, d]: [text | image] (``image_first``: [image | text]), each
    stream RMS-normed with its own weight and rotated (one fused kernel when compiled: the concatenation is
    written in place)."""
    img_cos, img_sin, txt_cos, txt_sin = rope
    parts = [qk_norm_rope(txt, w_txt, eps_txt, txt_cos, txt_sin), qk_norm_rope(img, w_img, eps_img, img_cos, img_sin)]
    return torch.cat(parts[::-1] if image_first else parts, dim=1)


def mlp(ff: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """diffusers' ``FeedForward`` (Linear -> GELU(tanh) -> Linear); on CUDA the GELU runs in the first
    GEMM's epilogue (cuBLASLt), saving a pass over the 4x-wide activations."""
    act = ff.net[0]
    proj = act.proj
    if h.is_cuda and act.approximate == "tanh" and proj.bias is not None:
        y = torch._addmm_activation(proj.bias, h.reshape(-1, h.shape[-1]), proj.weight.t(), use_gelu=True)
        y = y.view(*h.shape[:-1], -1)
    else:
        y = F.gelu(proj(h), approximate=act.approximate)
    return ff.net[2](y)


def gated_add_bias(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + gate * (y + bias): an output projection's bias folded into the gated residual (one kernel fused)."""
    return torch.addcmul(x, gate, y + bias)


def projected_residual(k, x: torch.Tensor, gate: torch.Tensor, o: torch.Tensor, linear: nn.Linear,
                       pack: torch.Tensor | None = None) -> torch.Tensor:
    """x + gate * linear(o). On a strided ``o`` (a stream's half of the joint attention output) ``F.linear``
    runs a matmul and a separate bias add; here the bias goes into the gated residual instead. ``pack``: the
    projection over those positions of ``o`` only (caption packing)."""
    if pack is not None:
        return k.gated_add(x, gate, packed(linear, o, pack))
    if o.is_contiguous() or linear.bias is None:
        return k.gated_add(x, gate, linear(o))
    return k.gated_add_bias(x, gate, torch.matmul(o, linear.weight.t()), linear.bias)


class Kernels:
    """The elementwise helpers a block calls: eager, or compiled into fused kernels."""

    def __init__(self):
        self.ln_modulate, self.gated_add, self.joint_qk = ln_modulate, gated_add, joint_qk
        self.gated_add_bias = gated_add_bias
        self.merge = merge                  # split attention's log-sum-exp merge
        self.split = False                  # set per call by the family: run the caption mask's split attention
        self.ragged = False                 # ... or its ragged attention over [image | text] (ragged_attention.py)
        self.qkv_kernel = OptionalKernel("Qwen-Image joint q/k/v")  # fused: one Triton kernel per stream
        self.use_norm_kernels = False       # DiTEngineConfig.norm_kernels: layer norm + modulation in Triton when fused
        self.ln_kernel = OptionalKernel("Qwen-Image layer norm + modulation", applies="ln_modulate_applies")

    def fuse(self) -> None:
        import omni_ray.dit.families.qwen_image_kernels as qwen_image_kernels  # Triton: imported when fused

        self.qkv_kernel.module = qwen_image_kernels
        self.ln_modulate = torch.compile(ln_modulate)
        self.gated_add = torch.compile(gated_add)
        self.gated_add_bias = torch.compile(gated_add_bias)
        self.joint_qk = torch.compile(joint_qk)
        self.merge = torch.compile(merge)
        if self.use_norm_kernels:
            import omni_ray.dit.families.ln_modulate_kernel as ln_modulate_kernel

            self.ln_kernel.module = ln_modulate_kernel
            self.ln_modulate = self._ln_modulate_kernel(self.ln_modulate)

    def _ln_modulate_kernel(self, compiled):
        def ln_modulate_(x, weight, bias, eps, scale1, shift):
            out = self.ln_kernel.call((x, scale1, shift, weight, bias), "ln_modulate", x, eps, scale1, shift)
            return compiled(x, weight, bias, eps, scale1, shift) if out is None else out
        return ln_modulate_

    def fused_qkv(self, cqkv, qkv, attn, rope, image_first=False):
        """(q, k, v) [B, H, T + N, d] from the Triton kernel (CUDA tensors), or None (``OptionalKernel``)."""
        return self.qkv_kernel.call((cqkv, qkv, attn), "joint_qkv", cqkv, qkv, attn, rope, image_first)


def supported(block: nn.Module) -> bool:
    a = block.attn
    return (not getattr(block, "zero_cond_t", False) and a.norm_q is not None and a.norm_added_q is not None
            and type(block.img_mlp.net[0]).__name__ == "GELU" and type(block.txt_mlp.net[0]).__name__ == "GELU")


class QwenImageBlock(nn.Module):
    """``QwenImageBlock(block, kernels)(x, ctx, ctx_bias, temb, rope, pack) -> (x, ctx)``; ``rope`` =
    (image cos, image sin, text cos, text sin), each [tokens, head_dim / 2] fp32; ``pack``: the caption
    positions the text stream's GEMMs run on (``omni_ray/dit/caption_pack.py``), None: all of them."""

    def __init__(self, block: nn.Module, kernels: Kernels):
        super().__init__()
        self.block = block
        self.k = kernels
        a = block.attn
        self.heads = a.heads
        self.sp = None                      # a sequence-parallel group (Ulysses), set by parallel.ulysses
        self.qkv_w, self.qkv_b = _fuse([a.to_q, a.to_k, a.to_v])
        self.cqkv_w, self.cqkv_b = _fuse([a.add_q_proj, a.add_k_proj, a.add_v_proj])

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_bias: torch.Tensor | None, temb: torch.Tensor,
                rope: tuple[torch.Tensor, ...], pack: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        blk, k, a = self.block, self.k, self.block.attn
        B, N, D = x.shape
        T, H = ctx.shape[1], self.heads
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = blk.img_mod(temb)[:, None].chunk(6, dim=-1)   # [B, 1, D] each
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = blk.txt_mod(temb)[:, None].chunk(6, dim=-1)

        # joint attention: [text | image], each stream with its own projections
        h = k.ln_modulate(x, None, None, blk.img_norm1.eps, 1 + i_sc1, i_sh1)
        c = k.ln_modulate(ctx, None, None, blk.txt_norm1.eps, 1 + t_sc1, t_sh1)
        qkv = F.linear(h, self.qkv_w, self.qkv_b).view(B, N, 3, H, -1)
        cqkv = packed(lambda h: F.linear(h, self.cqkv_w, self.cqkv_b), c, pack).view(B, T, 3, H, -1)
        if self.sp is not None and self.sp.active:          # x holds this rank's shard of the image tokens
            from omni_ray.dit.parallel.ulysses import ulysses_qwen_attention
            img_o, txt_o = ulysses_qwen_attention(self.sp, a, qkv, cqkv, ctx_bias, rope, qk_norm_rope)
            x = k.gated_add(x, i_g1, a.to_out[0](img_o))
            ctx = k.gated_add(ctx, t_g1, a.to_add_out(txt_o))
            return self._mlps(x, ctx, i_sh2, i_sc2, i_g2, t_sh2, t_sc2, t_g2, pack)
        ragged = ctx_bias is not None and k.ragged  # the joint sequence as [image | text], attended ragged
        fused = k.fused_qkv(cqkv, qkv, a, rope, ragged) if qkv.is_cuda else None
        if fused is not None:
            q, kk, v = fused                                                          # [B, H, T + N, d] each
        else:
            q = k.joint_qk(cqkv[:, :, 0], qkv[:, :, 0], a.norm_added_q.weight, a.norm_q.weight,
                           a.norm_added_q.eps, a.norm_q.eps, rope, ragged).transpose(1, 2)    # [B, H, T + N, d]
            kk = k.joint_qk(cqkv[:, :, 1], qkv[:, :, 1], a.norm_added_k.weight, a.norm_k.weight,
                            a.norm_added_k.eps, a.norm_k.eps, rope, ragged).transpose(1, 2)
            vs = [cqkv[:, :, 2], qkv[:, :, 2]]
            v = torch.cat(vs[::-1] if ragged else vs, dim=1).transpose(1, 2)
        if ragged:                                  # no mask: each row's real tokens one segment
            o = ragged_caption_attention(q, kk, v, ctx_bias, T).transpose(1, 2)           # [B, N + T, H, d]
        elif ctx_bias is not None and k.split:      # unmasked over the image keys, masked over the text keys
            o = split_caption_attention(q, kk, v, ctx_bias, T, k.merge).transpose(1, 2)
        else:
            mask = None if ctx_bias is None else F.pad(ctx_bias, (0, N))[:, None]     # [B, 1, 1, T + N]
            o = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask).transpose(1, 2)   # [B, T + N, H, d]
        img_o, txt_o = (o[:, :N], o[:, N:]) if ragged else (o[:, T:], o[:, :T])
        x = projected_residual(k, x, i_g1, img_o.reshape(B, N, D), a.to_out[0])
        ctx = projected_residual(k, ctx, t_g1, txt_o.reshape(B, T, D), a.to_add_out, pack)

        return self._mlps(x, ctx, i_sh2, i_sc2, i_g2, t_sh2, t_sc2, t_g2, pack)

    def _mlps(self, x, ctx, i_sh2, i_sc2, i_g2, t_sh2, t_sc2, t_g2, pack=None):
        blk, k = self.block, self.k
        x = k.gated_add(x, i_g2, mlp(blk.img_mlp, k.ln_modulate(x, None, None, blk.img_norm2.eps, 1 + i_sc2, i_sh2)))
        h = k.ln_modulate(ctx, None, None, blk.txt_norm2.eps, 1 + t_sc2, t_sh2)
        ctx = k.gated_add(ctx, t_g2, packed(lambda r: mlp(blk.txt_mlp, r), h, pack))
        if x.dtype == torch.float16:              # as the diffusers block: keep fp16 finite
            x, ctx = x.clip(-65504, 65504), ctx.clip(-65504, 65504)
        return x, ctx
