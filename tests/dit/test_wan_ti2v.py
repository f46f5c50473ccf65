"""Wan2.2 TI2V (``expand_timesteps``) on the DiT engine: latents and frames equal diffusers' WanPipeline
(text-to-video) and WanImageToVideoPipeline (image-to-video: the image's latents as the first frame at
timestep 0) with ``expand_timesteps`` (fp32, caching off, same seed); text- and image-to-video requests
with their own step counts share forwards and each video equals the one made alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from omni_ray.dit import DiffusionParams
from omni_ray.errors import InvalidRequestError
from tests.dit.conftest import fresh_scheduler, make_engine, tiled_decode_pair

TOL = 1e-4        # on [0, 1] frames
SIZE = dict(height=64, width=96, num_frames=5)


@pytest.fixture(scope="module")
def ti2v():
    return make_engine("tiny:wan2.2-ti2v")


@pytest.fixture(scope="module")
def first_frame():
    return Image.fromarray((np.random.default_rng(1).random((50, 70, 3)) * 255).astype("uint8"))


def pipeline(engine, i2v: bool):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    f = engine.family
    cls = WanImageToVideoPipeline if i2v else WanPipeline
    pipe = cls(tokenizer=f.tokenizer, text_encoder=f.text_encoder, vae=f.vae, scheduler=fresh_scheduler(engine),
               transformer=f.transformer, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(engine, prompt, output_type="np", image=None, **kw):
    return engine.generate(prompt, DiffusionParams(**kw), output_type=output_type, use_tqdm=False, image=image)[0]


def test_family_reads_the_wan22_configs(ti2v):
    f, vcfg = ti2v.family, ti2v.family.vae.config
    assert type(f).__name__ == "WanTI2VFamily" and f.expand_timesteps
    assert vcfg.is_residual and vcfg.patch_size == 2
    assert f.latent_channels == vcfg.z_dim == f.transformer.config.in_channels
    assert f.vae_scale_factor == vcfg.scale_factor_spatial and f.stride == vcfg.scale_factor_spatial * 2
    assert f.latents_std.flatten().tolist() == pytest.approx(vcfg.latents_std)
    assert f.default_hw == (704, 1280) and f.default_num_frames == 121


def test_t2v_equals_pipeline(ti2v):
    kw = dict(SIZE, num_inference_steps=2, guidance_scale=5.0)
    lat = gen(ti2v, "A red fox in the snow", "latent", seed=3, **kw)
    frames = gen(ti2v, "A red fox in the snow", seed=3, **kw)
    pipe = pipeline(ti2v, i2v=False)
    ref_lat = pipe("A red fox in the snow", generator=torch.Generator().manual_seed(3), output_type="latent",
                   **kw).frames[0]
    ref = pipe("A red fox in the snow", generator=torch.Generator().manual_seed(3), output_type="np", **kw).frames[0]
    z = ti2v.family.vae.config.z_dim
    assert lat.shape == ref_lat.shape == (z, 2, 64 // 16, 96 // 16)
    assert (lat - ref_lat).abs().max() < 1e-5
    assert frames.shape == ref.shape == (5, 64, 96, 3)
    assert 0.01 < float(np.std(ref)) and np.abs(frames - ref).max() < TOL


def test_i2v_equals_pipeline(ti2v, first_frame, monkeypatch):
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    monkeypatch.setattr(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean)   # (see test_wan.py)
    kw = dict(SIZE, num_inference_steps=2, guidance_scale=5.0)
    lat = gen(ti2v, "the fox runs", "latent", image=first_frame, seed=4, **kw)
    frames = gen(ti2v, "the fox runs", image=first_frame, seed=4, **kw)
    pipe = pipeline(ti2v, i2v=True)
    ref_lat = pipe(first_frame, "the fox runs", generator=torch.Generator().manual_seed(4), output_type="latent",
                   **kw).frames[0]
    ref = pipe(first_frame, "the fox runs", generator=torch.Generator().manual_seed(4), output_type="np",
               **kw).frames[0]
    assert (lat - ref_lat).abs().max() < 1e-5
    assert frames.shape == ref.shape == (5, 64, 96, 3)
    assert 0.01 < float(np.std(ref)) and np.abs(frames - ref).max() < TOL
    text_only = gen(ti2v, "the fox runs", "latent", seed=4, **kw)
    assert (text_only[:, 1:] - lat[:, 1:]).abs().max() > 1e-3        # the image conditions the later frames


def test_alone_equals_in_a_mixed_batch(ti2v, first_frame):
    """Image- and text-to-video requests with different step counts (per-token timesteps per row: the
    first frame at 0 in image rows only) share forwards; each video equals the one made alone."""
    specs = [(first_frame, dict(seed=1, num_inference_steps=3)), (None, dict(seed=2, num_inference_steps=2)),
             (first_frame, dict(seed=3, num_inference_steps=2, guidance_scale=1.0))]
    alone = [gen(ti2v, "a boat", "latent", image=im, **SIZE, **kw) for im, kw in specs]
    before = ti2v.engine_stats()["steps"]
    reqs = [ti2v.add_request("a boat", DiffusionParams(**SIZE, **kw), output_type="latent", image=im)
            for im, kw in specs]
    sizes = []
    while not all(r.is_finished for r in reqs):
        ti2v.step()
        sizes.append(ti2v.engine_stats()["last_batch_requests"])
    assert ti2v.engine_stats()["steps"] - before == 3 and sizes[0] == 3      # all three in every forward
    for r, ref in zip(reqs, alone):
        assert (r.images[0] - ref).abs().max() < 1e-5


def test_lean_block_equals_the_diffusers_block(ti2v, first_frame, monkeypatch):
    """The engine's blocks (two modulation segments) give what diffusers' blocks give on per-token tables."""
    from omni_ray.dit.families import wan

    monkeypatch.setattr(wan, "supported", lambda block: False)
    plain = make_engine("tiny:wan2.2-ti2v")
    assert all(type(f).__name__ == "DiffusersBlock" for f in plain.family.block_fns)
    kw = dict(SIZE, num_inference_steps=2, seed=9)
    a, b = (gen(e, "a heron", "latent", image=first_frame, **kw) for e in (ti2v, plain))
    assert (a - b).abs().max() < 1e-5


def test_tiled_decode_equals_the_wan22_vae(ti2v):
    """Sizes above 480p (its 704 x 1280 default) decode in tiles: with the Wan2.2 VAE's 2 x 2 patches too."""
    vae = ti2v.family.vae
    z = torch.randn(1, vae.config.z_dim, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    job, ref = tiled_decode_pair(vae, z, tile=64, stride=32, frames_per_step=1)
    assert job.tiled and len(job.grid) * len(job.grid[0]) == 4
    assert job.result().shape == ref.shape == (1, 3, 5, 64, 64) and torch.equal(job.result(), ref)


def test_bad_input(ti2v):
    with pytest.raises(InvalidRequestError) as e:
        ti2v.add_request("a fox", DiffusionParams(**SIZE), image=np.zeros((8, 8, 3)))
    assert e.value.param == "image"
    with pytest.raises(InvalidRequestError) as e:
        ti2v.add_request("a fox", DiffusionParams(height=48, width=96, num_frames=5))
    assert e.value.param == "height"
