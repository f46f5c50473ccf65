"""Small elementwise ops (norm, activation, rotary), written once in plain PyTorch.

The model runner may wrap them in ``torch.compile`` on CUDA so each becomes one fused kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(norm(x + residual), x + residual) -- the residual add fused into the norm."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return nn.functional.silu(gate) * up


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; cos/sin [N, D/2] (neox / rotate-half layout, as HF Llama/Qwen)."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def qkv_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int, d: int,
                  q_w: torch.Tensor | None, k_w: torch.Tensor | None, eps: float):
    """qkv [N, (nh + 2 nkv) d] -> q [N, nh, d], k, v [N, nkv, d]: split, per-head norm (Qwen3), rotary.
    One function so that torch.compile fuses it into a couple of kernels."""
    n = qkv.shape[0]
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], -1)
    q, k, v = q.reshape(n, nh, d), k.reshape(n, nkv, d), v.reshape(n, nkv, d)
    if q_w is not None:
        q, k = rms_norm(q, q_w, eps), rms_norm(k, k_w, eps)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.contiguous()


class Ops:
    """The op set a model uses. On CUDA ``for_cuda()`` swaps in one-launch versions of the row-wise
    ops: Triton kernels (``ar/kernels/triton_norm.py``) or torch.compile'd functions; and, for batches of at
    most ``small_m`` rows (decode of a few sequences), Triton GEMVs with the norm / activation in
    front of each projection fused in (``ar/kernels/triton_gemv.py``)."""

    def __init__(self):
        self.rms_norm, self.add_rms_norm = rms_norm, add_rms_norm
        self.silu_and_mul, self.apply_rotary = silu_and_mul, apply_rotary
        self.qkv_norm_rope = qkv_norm_rope
        self.small_m = 0

    def for_cuda(self, elementwise: str = "triton") -> "Ops":
        """elementwise: "triton" (a launch per op: cheapest on the host, which bounds eager steps)
        or "compile" (torch.compile, dynamic shapes)."""
        if elementwise == "triton":
            from omni_ray.ar.kernels import triton_norm
            self.rms_norm, self.add_rms_norm = triton_norm.rms_norm, triton_norm.add_rms_norm
            self.silu_and_mul = triton_norm.silu_and_mul
            return self
        for name in ("rms_norm", "add_rms_norm", "silu_and_mul", "apply_rotary", "qkv_norm_rope"):
            setattr(self, name, torch.compile(getattr(self, name), dynamic=True))
        return self

    # projections with what precedes them: x [M, K] -> [M, N] (w [N, K], the local TP shard)
    def norm_linear(self, x, residual, norm_w, eps, w, b=None):
        """(linear(rms_norm(x + residual)), x + residual); without a residual, (linear(rms_norm(x)), x)."""
        if x.shape[0] <= self.small_m:
            from omni_ray.ar.kernels.triton_gemv import gemv
            if residual is None:
                return gemv(x, w, b, prologue="norm", norm_w=norm_w, eps=eps), x
            return gemv(x, w, b, prologue="norm", residual=residual, norm_w=norm_w, eps=eps)
        if residual is None:
            h, residual = self.rms_norm(x, norm_w, eps), x
        else:
            h, residual = self.add_rms_norm(x, residual, norm_w, eps)
        return F.linear(h, w, b), residual

    def silu_mul_linear(self, x, w):
        """linear(silu(x[:, :K]) * x[:, K:])"""
        if x.shape[0] <= self.small_m:
            from omni_ray.ar.kernels.triton_gemv import gemv
            return gemv(x, w, prologue="silu_mul")
        return F.linear(self.silu_and_mul(x), w)

    def linear(self, x, w, b=None):
        if x.shape[0] <= self.small_m:
            from omni_ray.ar.kernels.triton_gemv import gemv
            return gemv(x, w, b)
        return F.linear(x, w, b)


# ----------------------------------------------------------------------------- rotary tables
def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    theta = float(rope.get("rope_theta", 10000.0))
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(rope["factor"])
    if kind == "llama3":
        factor, lo, hi = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old = float(rope["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        return torch.where(medium, smoothed, scaled)
    from omni_ray.errors import ConfigError
    raise ConfigError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


def rope_cos_sin(head_dim: int, max_pos: int, rope: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_pos, head_dim/2] in fp32."""
    inv = rope_inv_freq(head_dim, rope)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return freqs.cos(), freqs.sin()


# ----------------------------------------------------------------------------- M-RoPE
def mrope_rows(sections: list[int], half: int) -> torch.Tensor:
    """[half] int64: the position row (0 = t, 1 = h, 2 = w) of each rotary frequency. Section i of
    ``sections`` (consecutive frequencies) takes row i % 3, as transformers' Qwen2.5-VL/Omni rotary."""
    rows = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(sections)])
    return rows[:half]


def mrope_cos_sin(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables [max_pos, D/2], positions [3, N], rows [D/2] -> per-token cos, sin [N, D/2] (contiguous):
    out[n, j] = table[positions[rows[j], n], j]. When the three rows are equal this is table[positions[0]]."""
    idx = positions[rows].t()                                   # [N, D/2]
    return cos.gather(0, idx), sin.gather(0, idx)
