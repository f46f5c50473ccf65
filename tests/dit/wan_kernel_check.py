"""Run with TRITON_INTERPRET=1 (tests/dit/test_wan_kernels.py): the Triton q / k kernel of Wan's self-attention
against the block's eager ``rms_rope``, on CPU tensors through Triton's interpreter. Prints the max differences."""

import sys

import torch

from omni_ray.dit.families import wan_kernels
from omni_ray.dit.families.wan_block import rms_rope


class Attn(torch.nn.Module):
    """The two RMS norms across heads of diffusers' Wan self-attention (``nn.RMSNorm`` over H * d)."""

    def __init__(self, D, dtype, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm_q = torch.nn.RMSNorm(D, eps=1e-6)
        self.norm_k = torch.nn.RMSNorm(D, eps=1e-5)
        for n in (self.norm_q, self.norm_k):
            n.weight.data = (torch.rand(D, generator=g) + 0.5).to(dtype)


def inputs(B, N, H, d, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(B, N, 3 * H * d, generator=g) * 3).to(dtype).to(device)
    ang = torch.rand(N, d // 2, generator=g) * 6
    return qkv, ang.cos().to(device), ang.sin().to(device), Attn(H * d, dtype).to(device)


def diffs(qkv, cos, sin, a, H):
    """Max differences of q and k from the eager helper: bf16 in ulps at each head row's largest value, fp32
    absolute."""
    q, k = wan_kernels.qk_rms_rope(qkv, a.norm_q, a.norm_k, H, cos, sin)
    D = qkv.shape[-1] // 3
    rq = rms_rope(qkv[..., :D], a.norm_q.weight, a.norm_q.eps, H, cos, sin)
    rk = rms_rope(qkv[..., D:2 * D], a.norm_k.weight, a.norm_k.eps, H, cos, sin)
    assert q.shape == rq.shape and q.dtype == rq.dtype
    bf16 = qkv.dtype == torch.bfloat16
    out = []
    for x, r in ((q, rq), (k, rk)):
        scale = r.float().abs().amax(-1, keepdim=True) * 2.0 ** -7 if bf16 else 1.0
        out.append(((x.float() - r.float()).abs() / scale).max().item())
    return out


if __name__ == "__main__":
    # three heads of 16 (a row of 48: not a power of two) and two of 12 (a head dim padded to 16 in the
    # kernel, as the tiny Wan checkpoints have), a batch of 2 rows of 5 tokens
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        worst[dtype] = 0.0
        for H, d in ((3, 16), (2, 12)):
            qkv, cos, sin, a = inputs(2, 5, H, d, dtype)
            worst[dtype] = max(worst[dtype], *diffs(qkv, cos, sin, a, H))
        print(f"{dtype} {worst[dtype]:.3g}")
    # the interpreter rounds bf16 by truncation (see qwen_image_kernel_check.py): a loose bound there
    sys.exit(0 if worst[torch.float32] <= 1e-5 and worst[torch.bfloat16] <= 8.0 else 1)
