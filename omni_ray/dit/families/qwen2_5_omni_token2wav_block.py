"""Qwen2.5-Omni token2wav's DiT forward laid out for many forwards over the same inputs (a window's ODE).

The math of transformers' ``Qwen2_5OmniToken2WavDiTModel`` (``DiTDecoderLayer`` x L, then the final
modulation and projection), with what does not change over one ODE done once and fewer kernels per block:

- per ODE (``prepare``): the conditioning columns' share of the input projection (only the mel's changes
  between evaluations), the rotary cos / sin, one boolean attention mask per distinct (look-back,
  look-ahead) of the layers (the reference derives the mask in every layer of every forward);
- the time embedding, then every block's adaLN modulation and the final one in ONE GEMM (the blocks'
  ``attn_norm.linear`` weights stacked, L+1 small GEMMs and SiLUs per forward in the reference): for every
  evaluation of the ODE at once when ``prepare`` is given the times and the result is small (its weights,
  ~280 MB at the 7B shape in bf16, then stream through once per ODE, not once per forward), else per forward;
- per block: q / k / v in one GEMM (stacked weights); the block's last gated residual is added at the start
  of the next block (``_block``'s ``ff`` / ``gate``), so with ``compile`` it fuses into that block's layer norm.

The stacked weights are the transformer's own (its dtype: the bf16 copy under ``precision: bf16``): its
linears become views into them, so nothing is stored twice and the layer-by-layer forward still runs. Runs
under the caller's precision context (bf16 autocast, TF32 matmuls or none), as the per-layer forward does; the
residual stream stays float32. CPU tests: equal to the reference
forward within float32 rounding (tests/dit/test_omni_token2wav_block.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omni_ray.dit.families.pixart_block import _fuse

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What every forward of one ODE shares (``Token2WavBlocks.prepare``)."""
    ctx: torch.Tensor                          # [R, T, D]  the columns through the input projection (+ its bias)
    cos: torch.Tensor                          # [R, 1, T, hd]
    sin: torch.Tensor                          # [R, 1, T, hd]
    masks: dict[tuple[int, int], torch.Tensor]  # (back, ahead) -> [R, 1, T, T] bool: key attended
    mods: torch.Tensor | None = None           # [E, R, (6L + 2) D]  every evaluation's modulations (``times`` given)


def _rope_head0(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference's RoPE on the first head only ([R, H, T, hd]): the head dim de-interleaved
    (x0, x2, .., x1, x3, ..), then the half-split rotation; the other heads as they are."""
    h0 = q[:, :1]
    h0 = torch.cat((h0[..., 0::2], h0[..., 1::2]), dim=-1)
    half = h0.shape[-1] // 2
    rot = torch.cat((-h0[..., half:], h0[..., :half]), dim=-1)
    h0 = h0 * cos + rot * sin
    return torch.cat((h0.to(q.dtype), q[:, 1:]), dim=1)


def _block(h, ff, gate, mod, qkv_w, qkv_b, out_w, out_b, ff1_w, ff1_b, ff2_w, ff2_b, cos, sin, mask,
           heads: int):
    """One ``DiTDecoderLayer`` with the previous block's last gated residual (``ff``, ``gate``) added first.
    h [R, T, D] float32, ``mod`` [R, 6, D] (shift / scale / gate for attention, then for the MLP).
    Returns (h before this block's MLP residual, the MLP output, its gate)."""
    if ff is not None:
        h = h + gate[:, None] * ff
    R, T, D = h.shape
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unbind(1)
    x = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale_a[:, None]) + shift_a[:, None]
    q, k, v = F.linear(x, qkv_w, qkv_b).view(R, T, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = _rope_head0(q, cos, sin), _rope_head0(k, cos, sin)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)               # [R, H, T, hd]
    a = F.linear(a.transpose(1, 2).reshape(R, T, -1).to(q.dtype), out_w, out_b)
    h = h + gate_a[:, None] * a
    x = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale_m[:, None]) + shift_m[:, None]
    ff = F.linear(F.gelu(F.linear(x, ff1_w, ff1_b), approximate="tanh"), ff2_w, ff2_b)
    return h, ff, gate_m


class Token2WavBlocks:
    """The token2wav transformer's forward as ``prepare`` (once per ODE) + ``forward`` (per evaluation)."""

    def __init__(self, transformer, block_diff, compile: bool = False):
        """``transformer``: a ``Qwen2_5OmniToken2WavDiTModel``; ``block_diff(R, T, lengths)``: the family's block
        distances [R, 1, T, T] (padded keys of real queries far away); ``compile``: torch.compile the block."""
        dit = self.dit = transformer
        blocks = dit.transformer_blocks
        self.block_diff = block_diff
        self.heads = dit.num_attention_heads
        self.layers = len(blocks)
        mel = dit.mel_dim
        self.mod_w, self.mod_b = _fuse([b.attn_norm.linear for b in blocks] + [dit.norm_out.linear])  # [(6L+2)D, D]
        self.weights = []
        for b in blocks:
            a, f = b.attn, b.ff.ff
            self.weights.append((*_fuse([a.to_q, a.to_k, a.to_v]),
                                 a.to_out[0].weight, a.to_out[0].bias, f[0].weight, f[0].bias, f[3].weight, f[3].bias))
        self.windows = [(b.look_backward_block, b.look_ahead_block) for b in blocks]
        proj = dit.input_embed.proj
        self.in_x_w = proj.weight.detach()[:, :mel].contiguous()               # [D, mel]
        self.in_c_w = proj.weight.detach()[:, mel:].contiguous()               # [D, C]
        self.in_b = proj.bias.detach()
        self.compiled = torch.compile(_block, dynamic=True) if compile else None

    def block(self, *args):
        """``_block``, compiled when asked; a compilation that fails is logged once and the block runs eagerly
        from then on (the first forwards run before any CUDA graph capture: the graphs' warm-up)."""
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as err:                          # Inductor / Triton unavailable or failing here
                log.warning("token2wav: torch.compile of the DiT block failed, running it eagerly: %r", err)
                self.compiled = None
        return _block(*args)

    def modulations(self, t: torch.Tensor) -> torch.Tensor:
        """Times [N] -> every block's and the final modulation [N, (6L + 2) D] (the linears' output dtype)."""
        return F.linear(F.silu(self.dit.time_embed(t)), self.mod_w, self.mod_b)

    @torch.no_grad()
    def prepare(self, ctx: torch.Tensor, lengths: torch.Tensor | None, times: torch.Tensor | None = None,
                max_mod_bytes: int = 192 << 20) -> Prepared:
        """ctx [R, T, C] conditioning columns, lengths [R] real frames per row (None: all T); ``times`` [E, R]:
        every evaluation's times, whose modulations are then made here when they take at most
        ``max_mod_bytes`` (``forward(..., step=e)`` reads them)."""
        R, T = ctx.shape[:2]
        c = F.linear(ctx, self.in_c_w, self.in_b).float()
        pos = torch.arange(T, device=ctx.device)[None].expand(R, T)
        cos, sin = self.dit.rotary_embed(c, pos)                               # [R, T, hd] float32
        diff = self.block_diff(R, T, lengths)
        masks = {w: (diff >= -w[0]) & (diff <= w[1]) for w in set(self.windows)}
        mods = None
        if times is not None and times.numel() * self.mod_w.shape[0] * 4 <= max_mod_bytes:
            mods = self.modulations(times.reshape(-1)).view(*times.shape, -1)
        return Prepared(c, cos[:, None], sin[:, None], masks, mods)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, p: Prepared, step: int | None = None) -> torch.Tensor:
        """x [R, T, mel] noisy mels, t [R] times (evaluation ``step`` of ``prepare``'s ``times``) -> the
        prediction [R, T, mel] float32."""
        R, L, D = x.shape[0], self.layers, self.in_b.shape[0]
        mods = (p.mods[step] if step is not None and p.mods is not None else self.modulations(t)).float()
        block_mods, (scale, shift) = mods[:, :6 * L * D].view(R, L, 6, D), mods[:, 6 * L * D:].view(R, 2, D).unbind(1)
        h = F.linear(x, self.in_x_w).float() + p.ctx
        ff = gate = None
        for i in range(L):
            h, ff, gate = self.block(h, ff, gate, block_mods[:, i], *self.weights[i], p.cos, p.sin,
                                     p.masks[self.windows[i]], self.heads)
        h = h + gate[:, None] * ff
        h = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return self.dit.proj_out(h).float()
