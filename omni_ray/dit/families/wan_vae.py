"""The Wan VAE's decoder made lean (CUDA): the work around its convolutions.

One 81-frame 832x480 video through ``AutoencoderKLWan.decode`` (diffusers, bf16, H100) takes 2.07 s, of which
the convolutions are ~0.67 s. The rest is elementwise: each ``WanRMS_norm`` is six passes over a full-resolution
activation (cast to fp32, norm, divide, cast back, two products) and the SiLU after it a seventh; each causal
convolution pads its input with ``F.pad`` (a copy); cuDNN transposes every activation to channels-last and back.
``lean_decoder(vae)`` changes the decoder's modules in place:

- convolution weights channels-last, so cuDNN takes the activations as they are and returns them channels-last;
- each RMS norm together with the SiLU after it as one Triton kernel (``rms_norm_silu``): channels-last puts a
  voxel's channels next to each other, one row of the kernel;
- causal convolutions pad height and width inside the convolution; only the causal time padding is a copy.

Measured (H100, the same video, bf16): channels-last weights alone, 1.86 s; the whole lean decoder 1.16 s,
46.8 dB PSNR against diffusers' frames (the engine's ``vae_lean_decoder``, on by default). What is left of the
1.16 s: the convolutions ~0.72 s (cuDNN's own pick: its benchmark mode picks the same), the causal padding and
feature-cache copies ~0.15 s, nearest upsampling ~0.05 s, the norm kernel ~0.05 s.

The arithmetic is diffusers' except where it rounds: the kernel computes the norm, its scale and the SiLU in
fp32 and rounds once (diffusers rounds the normalized value, then each product). The feature caches, the
call signatures and ``_cached_conv_counts`` stay as they were, so ``vae.decode`` and ``VideoDecode`` run the
lean modules unchanged. A diffusers pipeline that shares the VAE module runs them too (bench_wan.py gives
diffusers its own copy).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanCausalConv3d,
    WanDecoder3d,
    WanResidualBlock,
)
from torch import nn

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"     # the CPU tests run the kernel through the interpreter
EPS = 1e-12                                                # F.normalize's


@triton.jit
def _rms_norm_silu_kernel(X, G, B, Y, rows, C, scale, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          HAS_B: tl.constexpr, SILU: tl.constexpr):
    """Rows of X [rows, C] (a channels-last activation's voxels): x / max(|x|, eps) * scale * G (+ B), SiLU."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < C)
    off = r[:, None].to(tl.int64) * C + c[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), eps)
    g = tl.load(G + c, mask=c < C, other=0.0).to(tl.float32) * scale
    y = x * inv[:, None] * g[None, :]
    if HAS_B:
        y += tl.load(B + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


def _channels_last(x: torch.Tensor) -> torch.memory_format | None:
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())


def applies(x: torch.Tensor) -> bool:
    """The kernel takes CUDA activations of 4 or 5 dims (under the interpreter: CPU ones)."""
    return (x.is_cuda or _INTERPRET) and _channels_last(x) is not None and x.shape[1] <= 4096


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias, scale: float, silu: bool) -> torch.Tensor:
    """``WanRMS_norm`` over dim 1 (``gamma`` / ``bias``: its parameters, any shape of C elements; ``bias`` may
    be 0.0), then SiLU if ``silu``; one kernel. The output is channels-last."""
    x = x.contiguous(memory_format=_channels_last(x))
    C = x.shape[1]
    y = torch.empty_like(x)
    rows = x.numel() // C
    BLOCK_C = triton.next_power_of_2(C)
    BLOCK_R = max(1, 4096 // BLOCK_C)
    has_b = isinstance(bias, torch.Tensor)
    g = gamma.reshape(C).contiguous()
    b = bias.reshape(C).contiguous() if has_b else g
    _rms_norm_silu_kernel[(triton.cdiv(rows, BLOCK_R),)](x, g, b, y, rows, C, float(scale), EPS, BLOCK_R=BLOCK_R,
                                                         BLOCK_C=BLOCK_C, HAS_B=has_b, SILU=silu)
    return y


class LeanRMSNorm(nn.Module):
    """A ``WanRMS_norm`` (its parameters, not copies) and, with ``silu``, the SiLU that follows it."""

    def __init__(self, norm: nn.Module, silu: bool):
        super().__init__()
        self.norm, self.silu = norm, silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if n.channel_first and applies(x):
            return rms_norm_silu(x, n.gamma, n.bias, n.scale, self.silu)
        y = n(x)
        return F.silu(y) if self.silu else y


class LeanCausalConv3d(WanCausalConv3d):
    """``WanCausalConv3d`` with the height / width zero padding inside the convolution; only the causal time
    padding (the cached frames, else zeros) is a copy."""

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        t = self.time_pad
        if cache_x is not None and t > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            t -= cache_x.shape[2]
        if t > 0:
            x = F.pad(x, (0, 0, 0, 0, t, 0))
        return nn.Conv3d.forward(self, x)


def lean_conv(conv: nn.Module) -> nn.Module:
    """A ``LeanCausalConv3d`` holding ``conv``'s parameters, weight channels-last."""
    pw, _, ph, _, pt, _ = conv._padding                    # (w, w, h, h, 2 * t, 0)
    with torch.device("meta"):
        new = LeanCausalConv3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0)
    new.weight, new.bias = conv.weight, conv.bias
    new.weight.data = new.weight.data.contiguous(memory_format=torch.channels_last_3d)
    new.padding, new.time_pad = (0, ph, pw), pt
    new._padding = conv._padding
    return new.train(conv.training)


def lean_decoder(vae: nn.Module) -> int:
    """Make ``vae.decoder`` (and ``post_quant_conv``) lean in place; returns the number of modules replaced.
    A decoder made lean before is left as it is."""
    n = 0
    for parent in list(vae.decoder.modules()):
        if isinstance(parent, (WanResidualBlock, WanDecoder3d)) and isinstance(parent.nonlinearity, nn.SiLU):
            for name in ("norm1", "norm2", "norm_out"):          # each followed by the module's SiLU
                if hasattr(parent, name):
                    setattr(parent, name, LeanRMSNorm(getattr(parent, name), silu=True))
                    n += 1
            parent.nonlinearity = nn.Identity()
        if isinstance(parent, WanAttentionBlock) and not isinstance(parent.norm, LeanRMSNorm):
            parent.norm = LeanRMSNorm(parent.norm, silu=False)
            n += 1
        for name, child in list(parent.named_children()):
            if isinstance(child, WanCausalConv3d) and not isinstance(child, LeanCausalConv3d):
                setattr(parent, name, lean_conv(child))
                n += 1
            elif type(child) is nn.Conv2d:
                child.weight.data = child.weight.data.contiguous(memory_format=torch.channels_last)
    if isinstance(vae.post_quant_conv, WanCausalConv3d) and not isinstance(vae.post_quant_conv, LeanCausalConv3d):
        vae.post_quant_conv = lean_conv(vae.post_quant_conv)
        n += 1
    return n
