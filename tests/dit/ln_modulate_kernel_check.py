"""Run with TRITON_INTERPRET=1 (tests/dit/test_ln_modulate_kernel.py): the Triton layer norm + modulation kernel
against the eager helpers it replaces (Wan's ``modulate``: fp32 modulation; Qwen-Image's ``ln_modulate``: the
modulation in the activations' dtype), on CPU tensors through Triton's interpreter. Prints the max differences."""

import sys

import torch

from omni_ray.dit.families import ln_modulate_kernel
from omni_ray.dit.families.pixart_block import gated_add, ln_modulate
from omni_ray.dit.families.qwen_image_block import gated_add_bias
from omni_ray.dit.families.wan_block import gated_residual, layer_norm, modulate


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


def add_diff(x, scale1, shift, gated: bool, eps=1e-6):
    """``add_ln_modulate`` against the helpers it stands for: Wan's gated residual (fp32 gate), or a plain add,
    then Wan's ``modulate``; the new residual and the norm each."""
    g = torch.Generator().manual_seed(4)
    y = (torch.randn(x.shape, generator=g) * 3).to(x.dtype).to(x.device)
    gate = (torch.randn(scale1.shape, generator=g)).to(x.device) if gated else None
    r, out = ln_modulate_kernel.add_ln_modulate(x, y, gate, eps, scale1, shift)
    ref_r = gated_residual(x, y, gate) if gated else x + y
    assert r.shape == out.shape == x.shape and r.dtype == out.dtype == x.dtype
    return max(ulps(r, ref_r), ulps(out, modulate(ref_r, eps, scale1, shift)))


def qwen_add_diff(x, with_bias: bool, eps=1e-6):
    """``add_ln_modulate`` as Qwen-Image's image stream calls it (gate, modulation and output bias in the activations'
    dtype) against its helpers: ``gated_add`` / ``gated_add_bias``, then ``ln_modulate``."""
    g = torch.Generator().manual_seed(5)
    B, _, D = x.shape
    y = (torch.randn(x.shape, generator=g) * 3).to(x.dtype).to(x.device)
    gate = torch.randn(B, 1, D, generator=g).to(x.dtype).to(x.device)
    bias = torch.randn(D, generator=g).to(x.dtype).to(x.device) if with_bias else None
    scale1 = (1 + torch.randn(B, 1, D, generator=g) * 0.1).to(x.dtype).to(x.device)
    shift = torch.randn(B, 1, D, generator=g).to(x.dtype).to(x.device)
    r, out = ln_modulate_kernel.add_ln_modulate(x, y, gate, eps, scale1, shift, bias)
    ref_r = gated_add_bias(x, gate, y, bias) if with_bias else gated_add(x, gate, y)
    return max(ulps(r, ref_r), ulps(out, ln_modulate(ref_r, None, None, eps, scale1, shift)))


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
        for gated in (True, False):            # the residual before the norm: gated (fp32 gate) or a plain add
            d = add_diff(*inputs(2, 5, 40, dtype), gated=gated)
            worst[dtype] = max(worst[dtype], d)
            print(f"{dtype} residual (gated={gated}) + norm {d:.3g}")
        for with_bias in (True, False):        # Qwen-Image's image stream: the output projection's bias or not
            d = qwen_add_diff(inputs(2, 5, 40, dtype)[0], with_bias)
            worst[dtype] = max(worst[dtype], d)
            print(f"{dtype} Qwen-Image residual (bias={with_bias}) + norm {d:.3g}")
    # the interpreter rounds bf16 by truncation (see qwen_image_kernel_check.py): a loose bound there
    sys.exit(0 if worst[torch.float32] <= 1e-5 and worst[torch.bfloat16] <= 8.0 else 1)
