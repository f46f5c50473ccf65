"""The Triton q / k kernel of Wan's self-attention (omni_ray/dit/families/wan_kernels.py) against the block's eager
``rms_rope``: on the CPU through Triton's interpreter (a subprocess), on CUDA at the real models' widths; the block
uses its norm kernels only where they apply and when configured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.dit.conftest import run_interpreted

CHECK = Path(__file__).with_name("wan_kernel_check.py")


def test_interpreted_kernel_equals_the_eager_helper():
    out = run_interpreted(CHECK)
    assert "torch.float32" in out and "torch.bfloat16" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads,d", [(12, 128), (40, 128), (2, 12)])   # Wan 1.3B, 14B; the tiny checkpoints
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_equals_the_eager_helper(heads, d, dtype):
    sys.path.insert(0, str(CHECK.parent))
    import wan_kernel_check as check

    from omni_ray.dit.families import wan_kernels

    qkv, cos, sin, a = check.inputs(2, 333, heads, d, dtype, device="cuda")
    assert wan_kernels.applies(qkv, a.norm_q, a.norm_k, cos)
    worst = max(check.diffs(qkv, cos, sin, a, heads))
    assert worst <= (2.0 if dtype == torch.bfloat16 else 1e-5), worst


def test_the_block_uses_the_kernels_only_where_they_apply():
    """A call a kernel does not take: the helpers' path, the same q / k as ``rms_rope``, the same modulation."""
    from omni_ray.dit.families.wan_block import Kernels, layer_norm, modulate, rms_rope

    sys.path.insert(0, str(CHECK.parent))
    import wan_kernel_check as check

    class Never:
        calls = 0

        @staticmethod
        def applies(*args):
            return False

        ln_modulate_applies = applies

    kernels = Kernels()
    kernels.qk_kernel.module = Never
    qkv, cos, sin, a = check.inputs(1, 4, 2, 8, torch.float32)
    q, k = kernels.self_qk(qkv, a, 2, cos, sin)
    assert torch.equal(q, rms_rope(qkv[..., :16], a.norm_q.weight, a.norm_q.eps, 2, cos, sin))
    assert torch.equal(k, rms_rope(qkv[..., 16:32], a.norm_k.weight, a.norm_k.eps, 2, cos, sin))
    kernels.ln_kernel.module = Never
    import ln_modulate_kernel_check

    x, scale1, shift = ln_modulate_kernel_check.inputs(2, 5, 16, torch.float32)
    assert torch.equal(kernels._modulate_kernel(modulate)(x, 1e-6, scale1, shift), modulate(x, 1e-6, scale1, shift))
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    for args in ((w, b), (None, None)):              # the kernel not taking it; a norm without weight and bias
        assert torch.equal(kernels._layer_norm_kernel(layer_norm)(x, *args, 1e-5), layer_norm(x, *args, 1e-5))


def test_the_kernels_are_used_only_when_configured():
    """``DiTEngineConfig.norm_kernels`` (on by default): fused helpers get the Triton kernels only when it is on."""
    pytest.importorskip("triton")
    from omni_ray.config import DiTEngineConfig
    from omni_ray.dit.families import ln_modulate_kernel, wan_kernels
    from omni_ray.dit.families.wan_block import Kernels

    assert DiTEngineConfig.model_fields["norm_kernels"].default is True
    off, on = Kernels(), Kernels()
    on.use_norm_kernels = True
    off.fuse()
    on.fuse()
    assert off.qk_kernel.module is None and off.ln_kernel.module is None
    assert on.qk_kernel.module is wan_kernels and on.ln_kernel.module is ln_modulate_kernel
    # both norms that the layer norm kernel serves go through it (wrapping the compiled helpers)
    assert on.modulate.__name__ == "modulate_" and on.layer_norm.__name__ == "layer_norm_"
    assert off.modulate.__name__ != "modulate_" and off.layer_norm.__name__ != "layer_norm_"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offsets_past_2_31_elements():
    """The fused projection of a large video batch holds more than 2^31 elements: the last row's last tokens come
    out right (the kernel's offsets are 64-bit)."""
    sys.path.insert(0, str(CHECK.parent))
    import wan_kernel_check as check

    from omni_ray.dit.families import wan_kernels
    from omni_ray.dit.families.wan_block import rms_rope

    heads, d = 40, 128
    D = heads * d
    B, N = 2, (2**31) // (3 * D) + 64                          # the second row starts past 2^31
    qkv = torch.empty(B, N, 3 * D, dtype=torch.bfloat16, device="cuda")
    qkv[1, -8:] = torch.randn(8, 3 * D, device="cuda").to(torch.bfloat16)
    ang = torch.rand(N, d // 2, device="cuda") * 6
    a = check.Attn(D, torch.bfloat16).cuda()
    q, k = wan_kernels.qk_rms_rope(qkv, a.norm_q, a.norm_k, heads, ang.cos(), ang.sin())
    tail = qkv[1:, -8:]
    rq = rms_rope(tail[..., :D], a.norm_q.weight, a.norm_q.eps, heads, ang.cos()[-8:], ang.sin()[-8:])
    rk = rms_rope(tail[..., D:2 * D], a.norm_k.weight, a.norm_k.eps, heads, ang.cos()[-8:], ang.sin()[-8:])
    assert B * N * 3 * D > 2**31
    for x, r in ((q[1:, -8:], rq), (k[1:, -8:], rk)):
        assert (x.float() - r.float()).abs().max() <= 2 * 2.0 ** -7 * r.float().abs().max()


def test_applies_only_to_what_the_kernel_takes():
    """No RoPE tables, a head dim that does not divide the width, CPU tensors: the compiled helpers' calls."""
    sys.path.insert(0, str(CHECK.parent))
    import wan_kernel_check as check

    from omni_ray.dit.families import wan_kernels

    qkv, cos, sin, a = check.inputs(1, 4, 2, 8, torch.float32)
    assert not wan_kernels.applies(qkv, a.norm_q, a.norm_k, cos)                  # on the CPU
    assert not wan_kernels.applies(qkv, a.norm_q, a.norm_k, None)
    if torch.cuda.is_available():
        qkv, cos, sin, a = check.inputs(1, 4, 2, 8, torch.float32, device="cuda")
        assert wan_kernels.applies(qkv, a.norm_q, a.norm_k, cos)
        assert not wan_kernels.applies(qkv[..., :-6], a.norm_q, a.norm_k, cos[:, :3])  # head dim 6 of 14
