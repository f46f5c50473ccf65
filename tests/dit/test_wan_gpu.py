"""Wan on CUDA: CUDA graphs + the measured SDPA kernel give the eager fp32 latents; bf16 frames stay
close to diffusers' WanPipeline on the same weights; the two-expert model switches under graphs; Wan2.2 TI2V's
image and text rows share graphed forwards."""

import numpy as np
import pytest
import torch

from omni_ray.config import DiTEngineConfig, ModelConfig
from omni_ray.dit import DiffusionParams, DiTEngine
from tests.dit.conftest import rel_diff

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_engine(model="tiny:wan2.1-t2v", dtype="float32", **kw):
    return DiTEngine(DiTEngineConfig(model=ModelConfig(path=model, dtype=dtype), device="cuda", **kw))


@pytest.mark.parametrize("norm_kernels", [False, True])
@pytest.mark.parametrize("model", ["tiny:wan2.1-t2v", "tiny:wan2.2-t2v"])
def test_graphs_and_sdpa_choice_match_eager(model, norm_kernels):
    torch.backends.cuda.matmul.allow_tf32 = False
    fast = cuda_engine(model, norm_kernels=norm_kernels)
    eager = cuda_engine(model, cuda_graphs=False, attention_backend="math")
    params = [DiffusionParams(height=32, width=48, num_frames=n, num_inference_steps=s, seed=i)
              for i, (n, s) in enumerate(((5, 4), (5, 3), (9, 4)))]
    outs = []
    for eng in (fast, eager):
        reqs = [eng.add_request(f"prompt {i}", p, output_type="latent") for i, p in enumerate(params)]
        while not all(r.is_finished for r in reqs):
            eng.step()
        outs.append([r.images[0] for r in reqs])
    assert fast.runner.graphs.replays > 0 and fast.family.sdpa.picked
    kernels = fast.family.kernels                              # the Triton kernels ran (graphed) when asked
    assert kernels.qk_kernel.ran == kernels.ln_kernel.ran == norm_kernels
    for a, b in zip(*outs):
        assert rel_diff(a, b) < 1e-3


def test_ti2v_mixed_batch_graphs_match_eager():
    """Wan2.2 TI2V: image rows (per-token timesteps, [R, 2, 6, D] modulation) beside text rows under CUDA graphs."""
    from PIL import Image

    torch.backends.cuda.matmul.allow_tf32 = False
    image = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype("uint8"))
    fast = cuda_engine("tiny:wan2.2-ti2v")
    eager = cuda_engine("tiny:wan2.2-ti2v", cuda_graphs=False, attention_backend="math")
    specs = [(image, 4), (None, 3), (image, 3)]
    outs = []
    for eng in (fast, eager):
        reqs = [eng.add_request("a boat", DiffusionParams(height=64, width=96, num_frames=5, num_inference_steps=s,
                                                          seed=i), output_type="latent", image=im)
                for i, (im, s) in enumerate(specs)]
        while not all(r.is_finished for r in reqs):
            eng.step()
        outs.append([r.images[0] for r in reqs])
    assert fast.runner.graphs.replays > 0
    for a, b in zip(*outs):
        assert rel_diff(a, b) < 1e-3


def test_bf16_frames_close_to_pipeline():
    from diffusers import WanPipeline

    eng = cuda_engine(dtype="bfloat16")
    f = eng.family
    sched = type(f.base_scheduler).from_config(f.base_scheduler.config)
    pipe = WanPipeline(tokenizer=f.tokenizer, text_encoder=f.text_encoder, vae=f.vae, scheduler=sched,
                       transformer=f.transformer)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0)
    ours = eng.generate("a red fox", DiffusionParams(seed=3, **kw), output_type="np", use_tqdm=False)[0]
    ref = pipe("a red fox", generator=torch.Generator("cuda").manual_seed(3), output_type="np", **kw).frames[0]
    mse = float(np.mean((ours.astype(np.float64) - ref) ** 2))
    assert ours.shape == ref.shape == (9, 64, 64, 3) and 10 * np.log10(1 / max(mse, 1e-12)) > 30
