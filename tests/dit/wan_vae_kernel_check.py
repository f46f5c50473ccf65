"""Run with TRITON_INTERPRET=1 (tests/dit/test_wan_vae.py): the lean Wan VAE decoder's Triton RMS norm + SiLU
kernel on CPU tensors through Triton's interpreter, against diffusers' ``WanRMS_norm`` and SiLU, then a whole
lean decoder (kernel included) against diffusers' decode. Prints the max differences."""

import copy
import sys

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from omni_ray.dit.families import wan_vae
from omni_ray.testing.tiny_wan import TINY_VAE, TINY_VAE22

assert wan_vae._INTERPRET, "run with TRITON_INTERPRET=1"


def check_kernel(dtype, images, bias, silu, C=24):
    g = torch.Generator().manual_seed(0)
    norm = WanRMS_norm(C, images=images, bias=bias)
    norm.gamma.data = torch.rand(norm.gamma.shape, generator=g) + 0.5
    if bias:
        norm.bias.data = torch.randn(norm.bias.shape, generator=g)
    norm = norm.to(dtype)
    shape = (2, C, 5, 7) if images else (2, C, 3, 5, 7)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    ref = norm(x)
    ref = F.silu(ref) if silu else ref
    exact = copy.deepcopy(norm).float()(x.float())               # the same math in fp32, rounded nowhere
    exact = F.silu(exact) if silu else exact
    fmt = torch.channels_last if images else torch.channels_last_3d
    for xin in (x, x.contiguous(memory_format=fmt)):            # channels-first in: copied to channels-last
        out = wan_vae.LeanRMSNorm(norm, silu)(xin)
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous(memory_format=fmt)
        diff = (out.float() - exact).abs()
        # fp32: as diffusers; bf16: within one unit in the last place of the fp32 result (the interpreter's bf16
        # casts truncate; the CUDA test holds the kernel to diffusers' own bf16 error)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * exact.abs() + 1e-6
        assert (diff <= tol).all(), (dtype, images, bias, silu, diff.max().item())
    print(f"kernel {dtype} images={images} bias={bias} silu={silu}: max diff to fp32 {diff.max().item():.2e}")


def check_decoder(cfg, name):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**cfg).eval()
    lean = copy.deepcopy(vae)
    n = wan_vae.lean_decoder(lean)
    assert n > 0 and wan_vae.lean_decoder(lean) == 0               # a second call changes nothing
    z = torch.randn(1, cfg["z_dim"], 3, 4, 6)
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        out = lean.decode(z, return_dict=False)[0]
    err = (out - ref).abs().max().item()
    assert out.shape == ref.shape and err <= 1e-4, (name, err)
    print(f"decoder {name}: {n} modules lean, max diff {err:.2e}")


if __name__ == "__main__":
    for dtype in (torch.float32, torch.bfloat16):
        for images in (False, True):
            for bias in (False, True):
                for silu in (False, True):
                    check_kernel(dtype, images, bias, silu)
    check_decoder(TINY_VAE, "wan2.1")
    check_decoder(TINY_VAE22, "wan2.2")
    sys.exit(0)
