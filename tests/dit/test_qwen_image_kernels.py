"""The Triton kernel for Qwen-Image's joint q / k / v (omni_ray/dit/families/qwen_image_kernels.py) against the
block's eager helpers: on the CPU through Triton's interpreter (a subprocess: TRITON_INTERPRET is read when the
kernel is defined), on CUDA as the fused block runs it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.dit.conftest import run_interpreted

CHECK = Path(__file__).with_name("qwen_image_kernel_check.py")


def test_interpreted_kernel_equals_the_eager_helpers():
    out = run_interpreted(CHECK)
    assert "bfloat16 affine=True" in out and "float32 affine=False image_first=True" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_equals_the_eager_helpers(dtype):
    sys.path.insert(0, str(CHECK.parent))
    import qwen_image_kernel_check as check

    from omni_ray.dit.families import qwen_image_kernels as qk
    from omni_ray.dit.families.qwen_image_block import joint_qk

    B, T, N, H, d = 4, 70, 1024, 24, 128               # Qwen-Image's heads, a 512 px image, a padded caption
    cqkv = torch.randn(B, T, 3, H, d, device="cuda").to(dtype)
    qkv = torch.randn(B, N, 3, H, d, device="cuda").to(dtype)
    ang = torch.rand(T + N, d // 2, device="cuda") * 6
    rope = (ang[T:].cos(), ang[T:].sin(), ang[:T].cos(), ang[:T].sin())
    a = check.Attn(d, dtype, True).cuda()
    q, k, v = qk.joint_qkv(cqkv, qkv, a, rope)
    rq = joint_qk(cqkv[:, :, 0], qkv[:, :, 0], a.norm_added_q.weight, a.norm_q.weight, 1e-6, 1e-6, rope)
    rk = joint_qk(cqkv[:, :, 1], qkv[:, :, 1], a.norm_added_k.weight, a.norm_k.weight, 1e-6, 1e-6, rope)
    scale = rq.float().abs().amax(-1, keepdim=True) * 2.0 ** -7 if dtype == torch.bfloat16 else 1.0
    assert ((q.transpose(1, 2).float() - rq.float()).abs() / scale).max() <= (2.0 if dtype == torch.bfloat16 else 1e-5)
    assert ((k.transpose(1, 2).float() - rk.float()).abs() / scale).max() <= (2.0 if dtype == torch.bfloat16 else 1e-5)
    assert torch.equal(v.transpose(1, 2), torch.cat([cqkv[:, :, 2], qkv[:, :, 2]], dim=1))


def test_a_kernel_that_cannot_run_falls_back_for_good(caplog):
    """The fused block's first joint q/k/v call: a compile or launch error leaves the compiled helpers in charge."""
    from omni_ray.dit.families.qwen_image_block import Kernels

    class Broken:
        calls = 0

        @staticmethod
        def applies(*args):
            return True

        @classmethod
        def joint_qkv(cls, *args):
            cls.calls += 1
            raise RuntimeError("no kernel image for this device")

    kernels = Kernels()
    kernels.qkv_kernel.module = Broken
    assert kernels.fused_qkv(None, None, None, None) is None
    assert kernels.qkv_kernel.module is None and Broken.calls == 1 and "joint q/k/v kernel unavailable" in caplog.text
    assert kernels.fused_qkv(None, None, None, None) is None and Broken.calls == 1      # never tried again
