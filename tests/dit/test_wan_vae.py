"""The lean Wan VAE decoder (omni_ray/dit/families/wan_vae.py) against diffusers' AutoencoderKLWan: its RMS norm +
SiLU kernel through Triton's interpreter on the CPU (a subprocess: TRITON_INTERPRET is read at import), the
decoder's torch path on the CPU, kernel and decoder on CUDA, and the engine's decode with it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omni_ray.testing.tiny_wan import TINY_VAE, TINY_VAE22
from tests.dit.conftest import run_interpreted

CHECK = Path(__file__).with_name("wan_vae_kernel_check.py")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _vaes(cfg, device="cpu", dtype=torch.float32):
    from diffusers import AutoencoderKLWan

    from omni_ray.dit.families.wan_vae import lean_decoder

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**cfg).eval().to(device, dtype)
    lean = copy.deepcopy(vae)
    assert lean_decoder(lean) > 0
    return vae, lean


def test_interpreted_kernel_and_decoder_equal_diffusers():
    out = run_interpreted(CHECK)
    assert "decoder wan2.1" in out and "decoder wan2.2" in out


def test_kernel_compiles_for_hopper():
    """Without a GPU: Triton's NVIDIA backend (its bundled ptxas) builds the kernel for sm_90, in the dtypes and
    variants the decoder launches."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from omni_ray.dit.families.wan_vae import _rms_norm_silu_kernel

    for ptr in ("*bf16", "*fp32"):
        for has_b, silu in ((False, True), (True, False)):
            sig = dict.fromkeys(("X", "G", "B", "Y"), ptr) | {"rows": "i32", "C": "i32", "scale": "fp32",
                                                               "eps": "fp32"}
            sig |= dict.fromkeys(("BLOCK_R", "BLOCK_C", "HAS_B", "SILU"), "constexpr")
            src = ASTSource(fn=_rms_norm_silu_kernel, signature=sig,
                            constexprs={"BLOCK_R": 8, "BLOCK_C": 512, "HAS_B": has_b, "SILU": silu})
            assert len(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]) > 0


@pytest.mark.parametrize("cfg", [TINY_VAE, TINY_VAE22], ids=["wan2.1", "wan2.2"])
def test_lean_decoder_equals_diffusers_on_cpu(cfg):
    """On the CPU the lean modules run torch ops (the kernel is CUDA's): padding inside the convolutions, the
    SiLU folded into the norm module, channels-last weights. Chunked decodes through VideoDecode too."""
    from omni_ray.dit.families.wan_vae import LeanRMSNorm
    from omni_ray.dit.video_decode import VideoDecode

    vae, lean = _vaes(cfg)
    assert any(isinstance(m, LeanRMSNorm) for m in lean.decoder.modules())
    assert not any(isinstance(m, torch.nn.SiLU) for m in lean.decoder.modules())
    z = torch.randn(1, cfg["z_dim"], 4, 4, 6)
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        out = lean.decode(z, return_dict=False)[0]
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-4
    dec = VideoDecode(lean, z)
    while not dec.finished:
        dec.step(3)
    assert (dec.result() - ref.clamp(-1, 1)).abs().max() < 1e-4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("images", [False, True])
def test_cuda_kernel_no_further_from_fp32_than_diffusers(images):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from omni_ray.dit.families.wan_vae import LeanRMSNorm

    C = 384                                               # the 1.3B / 14B VAE's widest decoder level
    norm = WanRMS_norm(C, images=images).cuda()
    norm.gamma.data = torch.rand_like(norm.gamma) + 0.5
    shape = (4, C, 30, 52) if images else (1, C, 4, 30, 52)
    x = torch.randn(shape, device="cuda") * 3
    fmt = torch.channels_last if images else torch.channels_last_3d
    exact = F.silu(norm(x))
    bf = copy.deepcopy(norm).bfloat16()
    ref = F.silu(bf(x.bfloat16()))
    out = LeanRMSNorm(bf, silu=True)(x.bfloat16().contiguous(memory_format=fmt))
    assert out.is_contiguous(memory_format=fmt)
    assert (out.float() - exact).abs().max() <= (ref.float() - exact).abs().max()
    out32 = LeanRMSNorm(norm, silu=True)(x.contiguous(memory_format=fmt))
    assert (out32 - exact).abs().max() < 1e-5


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cfg", [TINY_VAE, TINY_VAE22], ids=["wan2.1", "wan2.2"])
def test_cuda_lean_decoder_close_to_diffusers(cfg):
    torch.backends.cudnn.allow_tf32 = False
    vae, lean = _vaes(cfg, "cuda")
    z = torch.randn(1, cfg["z_dim"], 5, 8, 12, device="cuda")
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        out = lean.decode(z, return_dict=False)[0]
    assert (out - ref).abs().max() < 1e-3
    vae, lean = vae.bfloat16(), lean.bfloat16()
    with torch.no_grad():
        ref = vae.decode(z.bfloat16(), return_dict=False)[0].float()
        out = lean.decode(z.bfloat16(), return_dict=False)[0].float()
    mse = float(((out - ref) ** 2).mean())
    assert 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))) > 35       # [-1, 1] frames: peak-to-peak 2


@pytest.mark.gpu
@cuda
def test_engine_makes_its_vae_lean_on_cuda():
    from omni_ray.config import DiTEngineConfig, ModelConfig
    from omni_ray.dit import DiTEngine
    from omni_ray.dit.families.wan_vae import LeanRMSNorm

    def has_lean(eng):
        return any(isinstance(m, LeanRMSNorm) for m in eng.family.vae.decoder.modules())

    cfg = dict(model=ModelConfig(path="tiny:wan2.1-t2v", dtype="float32"), device="cuda")
    assert has_lean(DiTEngine(DiTEngineConfig(**cfg)))                   # the default
    assert not has_lean(DiTEngine(DiTEngineConfig(**cfg, vae_lean_decoder=False)))
