"""The Triton layer norm + modulation kernel (omni_ray/dit/families/ln_modulate_kernel.py) against the helpers it
replaces in Wan's and Qwen-Image's blocks: on the CPU through Triton's interpreter (a subprocess), on CUDA at the
real models' widths; the Qwen-Image block uses it only when configured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.dit.conftest import run_interpreted

CHECK = Path(__file__).with_name("ln_modulate_kernel_check.py")


def test_interpreted_kernel_equals_the_eager_helpers():
    out = run_interpreted(CHECK)
    assert "torch.float32 modulation torch.float32" in out and "torch.bfloat16 modulation torch.bfloat16" in out
    assert "torch.bfloat16 affine layer norm" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("width", [1536, 3072, 5120])          # Wan 1.3B, Qwen-Image, Wan 14B
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_equals_the_eager_helpers(width, dtype):
    sys.path.insert(0, str(CHECK.parent))
    import ln_modulate_kernel_check as check

    from omni_ray.dit.families import ln_modulate_kernel

    for mod_dtype in {torch.float32, dtype}:
        x, scale1, shift = check.inputs(2, 333, width, dtype, mod_dtype, device="cuda")
        assert ln_modulate_kernel.ln_modulate_applies(x, scale1, shift)
        worst = check.diff(x, scale1, shift)
        # bf16 against Qwen-Image's helper: it rounds after the norm, the product and the sum, the kernel once
        bound = 1e-4 if dtype == torch.float32 else (2.0 if mod_dtype == torch.float32 else 3.0)
        assert worst <= bound, (mod_dtype, worst)
    assert check.affine_diff(x) <= (1e-4 if dtype == torch.float32 else 2.0)      # Wan's cross-attention norm


def test_qwen_image_block_uses_the_kernel_only_when_configured():
    pytest.importorskip("triton")
    from omni_ray.dit.families import ln_modulate_kernel
    from omni_ray.dit.families.qwen_image_block import Kernels

    off, on = Kernels(), Kernels()
    on.use_norm_kernels = True
    off.fuse()
    on.fuse()
    assert off.ln_kernel.module is None and on.ln_kernel.module is ln_modulate_kernel
    assert not ln_modulate_kernel.ln_modulate_applies(torch.zeros(1, 2, 4), torch.ones(1, 1, 4), torch.zeros(1, 1, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offsets_past_2_31_elements():
    """A batch of video rows holds more than 2^31 elements (4 videos of 81 frames at the 14B width: 8 rows x 32,760
    tokens x 5,120): the last row's last tokens come out right (the kernel's offsets are 64-bit)."""
    from omni_ray.dit.families import ln_modulate_kernel
    from omni_ray.dit.families.wan_block import modulate

    B, N, D = 2, (2**31) // 5120 // 2 + 64, 5120                 # the second row ends past 2^31
    x = torch.empty(B, N, D, dtype=torch.bfloat16, device="cuda")
    x[1, -8:] = torch.randn(8, D, device="cuda").to(torch.bfloat16)
    scale1 = 1 + 0.1 * torch.randn(B, 1, D, device="cuda")
    shift = torch.randn(B, 1, D, device="cuda")
    out = ln_modulate_kernel.ln_modulate(x, 1e-6, scale1, shift)
    ref = modulate(x[1:, -8:], 1e-6, scale1[1:], shift[1:])
    assert B * N * D > 2**31
    assert (out[1:, -8:].float() - ref.float()).abs().max() <= 2 * 2.0 ** -7 * ref.float().abs().max()
