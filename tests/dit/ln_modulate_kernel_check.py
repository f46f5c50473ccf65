"""Run with TRITON_INTERPRET=1 (tests/dit/test_ln_modulate_kernel.py): the Triton layer norm + modulation kernel
against the eager helpers it replaces (Wan's ``modulate``: fp32 modulation; Qwen-Image's ``ln_modulate``: the
modulation in the activations' dtype), on CPU tensors through Triton's interpreter. Prints the max differences."""

import sys

import torch

from omni_ray.dit.families import ln_modulate_kernel
from omni_ray.dit.families.pixart_block import ln_modulate
from omni_ray.dit.families.wan_block import layer_norm, modulate


def ulps(x, r):
    """Max difference: bf16 in ulps at each row's largest value, fp32 absolute."""
    scale = r.float().abs().amax(-1, keepdim=True) * 2.0 ** -7 if r.dtype == torch.bfloat16 else 1.0
    return ((x.float() - r.float()).abs() / scale).max().item()


def inputs(B, N, D, dtype, mod_dtype=torch.float32, device="cpu", shared_rows=False):
    """x [B, N, D] (a token slice of a longer sequence, as Wan's segments pass it), scale1 / shift [B, 1, D]
    (shift a view of a [B, 6, D] table, as the blocks' chunks are)."""
    g = torch.Generator().manual_seed(2)
    x = ((torch.randn(B, N + 3, D, generator=g) * 2 + 0.5).to(dtype).to(device))[:, 3:]
    rows = 1 if shared_rows else B
    scale1 = (1 + torch.randn(rows, 1, D, generator=g) * 0.1).to(mod_dtype).to(device)
    shift = torch.randn(rows, 6, D, generator=g).to(mod_dtype).to(device)[:, 4:5]
    return x, scale1, shift


def diff(x, scale1, shift, eps=1e-6):
    """The kernel against the helper it stands for: Wan's with an fp32 modulation, Qwen-Image's otherwise."""
    out = ln_modulate_kernel.ln_modulate(x, eps, scale1, shift)
    ref = modulate(x, eps, scale1, shift) if scale1.dtype == torch.float32 else \
        ln_modulate(x, None, None, eps, scale1, shift)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return ulps(out, ref)


def affine_diff(x, eps=1e-5):
    """The kernel as Wan's cross-attention layer norm (``FP32LayerNorm`` with weight and bias): the weight and the
    bias (the activations' dtype, read in fp32) as the one modulation row."""
    g = torch.Generator().manual_seed(3)
    D = x.shape[-1]
    w = (torch.rand(D, generator=g) + 0.5).to(x.dtype).to(x.device)
    b = torch.randn(D, generator=g).to(x.dtype).to(x.device)
    out = ln_modulate_kernel.ln_modulate(x, eps, w.view(1, 1, -1), b.view(1, 1, -1))      # as the Wan block does
    return ulps(out, layer_norm(x, w, b, eps))


if __name__ == "__main__":
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        for mod_dtype in {torch.float32, dtype}:
            for shared in (False, True):       # 40 wide (not a power of two); one modulation row for all, or one each
                d = diff(*inputs(2, 5, 40, dtype, mod_dtype, shared_rows=shared))
                worst[dtype] = max(worst.get(dtype, 0.0), d)
                print(f"{dtype} modulation {mod_dtype} shared={shared} {d:.3g}")
        d = affine_diff(inputs(2, 5, 40, dtype)[0])
        worst[dtype] = max(worst[dtype], d)
        print(f"{dtype} affine layer norm {d:.3g}")
    # the interpreter rounds bf16 by truncation (see qwen_image_kernel_check.py): a loose bound there
    sys.exit(0 if worst[torch.float32] <= 1e-5 and worst[torch.bfloat16] <= 8.0 else 1)
