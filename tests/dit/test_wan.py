"""Wan video on the DiT engine: latents and frames equal diffusers' WanPipeline /
WanImageToVideoPipeline (fp32, caching off, same seed), batching does not change a video, Wan2.2's
experts never share a forward, the chunked / tiled VAE decode equals the VAE's, bad input is a 400."""

import numpy as np
import pytest
import torch
from PIL import Image

from omni_ray.dit import DiffusionParams
from omni_ray.errors import InvalidRequestError
from tests.dit.conftest import fresh_scheduler, make_engine, tiled_decode_pair

TOL = 1e-4        # on [0, 1] frames


@pytest.fixture(scope="module")
def t2v():
    return make_engine("tiny:wan2.1-t2v", vae_decode_chunk=1)


@pytest.fixture(scope="module")
def i2v():
    return make_engine("tiny:wan2.1-i2v")


@pytest.fixture(scope="module")
def wan22():
    return make_engine("tiny:wan2.2-t2v")


@pytest.fixture(scope="module")
def first_frame():
    return Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype("uint8"))


def wan_pipeline(engine, i2v: bool = False):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    f = engine.family
    kw = dict(tokenizer=f.tokenizer, text_encoder=f.text_encoder, vae=f.vae, scheduler=fresh_scheduler(engine),
              transformer=f.experts[0])
    if i2v:
        pipe = WanImageToVideoPipeline(image_encoder=f.image_encoder, image_processor=f.image_processor, **kw)
    elif len(f.experts) > 1:
        pipe = WanPipeline(transformer_2=f.experts[1], boundary_ratio=f.boundary_timestep / 1000, **kw)
    else:
        pipe = WanPipeline(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(engine, prompt, output_type="np", image=None, **kw):
    return engine.generate(prompt, DiffusionParams(**kw), output_type=output_type, use_tqdm=False, image=image)


@pytest.mark.parametrize("negative", [None, "blurry, static"])
def test_t2v_equals_pipeline(t2v, negative):
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=5.0)
    latents = gen(t2v, "A red fox in the snow", "latent", seed=3, negative_prompt=negative, **kw)[0]
    frames = gen(t2v, "A red fox in the snow", seed=3, negative_prompt=negative, **kw)[0]
    pipe = wan_pipeline(t2v)
    ref_lat = pipe("A red fox in the snow", negative_prompt=negative, generator=torch.Generator().manual_seed(3),
                   output_type="latent", **kw).frames[0]
    ref = pipe("A red fox in the snow", negative_prompt=negative, generator=torch.Generator().manual_seed(3),
               output_type="np", **kw).frames[0]
    assert latents.shape == ref_lat.shape == (16, 2, 4, 6)
    assert (latents - ref_lat).abs().max() < 1e-5
    assert frames.shape == ref.shape == (5, 32, 48, 3) and frames.dtype == np.float32
    assert 0.01 < float(np.std(ref)) and np.abs(frames - ref).max() < TOL
    u8 = gen(t2v, "A red fox in the snow", "pil", seed=3, negative_prompt=negative, **kw)[0]
    assert u8.dtype == np.uint8 and u8.shape == (5, 32, 48, 3)
    assert np.abs(u8 / 255.0 - ref).max() <= 0.5 / 255 + 1e-4


def test_i2v_equals_pipeline(i2v, first_frame, monkeypatch):
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    # diffusers 0.42's I2V basic_clean calls ftfy even when it is not installed; the T2V one checks
    monkeypatch.setattr(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean)
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=5.0)
    ours = gen(i2v, "the fox runs", seed=4, image=first_frame, **kw)[0]
    ref = wan_pipeline(i2v, i2v=True)(first_frame, "the fox runs", generator=torch.Generator().manual_seed(4),
                                      output_type="np", **kw).frames[0]
    assert ours.shape == ref.shape == (5, 32, 48, 3)
    assert 0.01 < float(np.std(ref)) and np.abs(ours - ref).max() < TOL
    other = gen(i2v, "the fox runs", seed=4, image=first_frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT), **kw)[0]
    assert np.abs(other - ours).max() > 0.01            # the image conditions the video


def test_wan22_experts_equal_pipeline(wan22):
    """4 steps: t = 999, 900 on the high-noise expert, 750, 500 on the low-noise one."""
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0)
    ours = gen(wan22, "a boat", "latent", seed=5, **kw)[0]
    ref = wan_pipeline(wan22)("a boat", generator=torch.Generator().manual_seed(5), output_type="latent",
                              **kw).frames[0]
    assert (ours - ref).abs().max() < 1e-5
    one = wan_pipeline(wan22)
    one.transformer_2, one.config.boundary_ratio = None, None       # the first expert alone differs
    alone = one("a boat", generator=torch.Generator().manual_seed(5), output_type="latent", **kw).frames[0]
    assert (alone - ref).abs().max() > 1e-3


def test_wan22_experts_never_share_a_forward(wan22, monkeypatch):
    """Requests on different sides of the boundary step apart; on the same side, together."""
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0)
    experts_per_forward = []
    step = wan22.runner.step

    def recording_step(batch):
        experts_per_forward.append(sorted(int(float(r.timesteps[r.step_idx]) < wan22.family.boundary_timestep)
                                          for r in batch))
        step(batch)

    monkeypatch.setattr(wan22.runner, "step", recording_step)
    a = wan22.add_request("a boat", DiffusionParams(seed=1, **kw), output_type="latent")
    wan22.step()
    wan22.step()                                        # a: its next step is on the second expert
    b = wan22.add_request("a boat", DiffusionParams(seed=2, **kw), output_type="latent")
    while not (a.is_finished and b.is_finished):
        wan22.step()
    assert all(len(set(e)) == 1 for e in experts_per_forward)
    assert [0, 0] not in experts_per_forward and [1, 1] in experts_per_forward
    monkeypatch.undo()
    assert (a.images[0] - gen(wan22, "a boat", "latent", seed=1, **kw)[0]).abs().max() < 1e-5
    assert (b.images[0] - gen(wan22, "a boat", "latent", seed=2, **kw)[0]).abs().max() < 1e-5


def test_video_alone_equals_in_batch(t2v):
    """Videos of one shape share forwards (different seeds, steps, guidance); another shape waits
    its turn; each video equals the one made alone; the finished ones decode between steps."""
    specs = [("a cat", dict(seed=1, num_inference_steps=2)), ("a dog", dict(seed=2, num_inference_steps=3)),
             ("a cow", dict(seed=3, num_inference_steps=3, guidance_scale=1.0)),
             ("a bird", dict(seed=4, num_inference_steps=2, num_frames=9))]
    base = dict(height=32, width=32, num_frames=5)
    alone = [gen(t2v, p, **(base | kw))[0] for p, kw in specs]
    before = t2v.engine_stats()
    reqs = [t2v.add_request(p, DiffusionParams(**(base | kw)), output_type="np") for p, kw in specs]
    while not all(r.is_finished for r in reqs):
        t2v.step()
    stats = t2v.engine_stats()
    assert stats["max_batch_size"] >= 3 and stats["decoding_videos"] == 0
    assert stats["video_decode_chunks"] - before["video_decode_chunks"] == 2 + 2 + 2 + 3   # latent frames
    for r, ref in zip(reqs, alone):
        assert r.images[0].shape == ref.shape and np.abs(r.images[0] - ref).max() < 1e-5


def test_decode_runs_between_other_requests_steps(t2v):
    """A finished video decodes one chunk (here: one latent frame) per step while another denoises."""
    base = dict(height=32, width=32, num_frames=9, guidance_scale=1.0)
    short = t2v.add_request("a", DiffusionParams(seed=1, num_inference_steps=1, **base), output_type="np")
    long = t2v.add_request("b", DiffusionParams(seed=2, num_inference_steps=5, **base), output_type="np")
    t2v.step()                                          # short finishes denoising, decodes its first frame
    assert not short.is_finished and t2v.engine_stats()["decoding_videos"] == 1
    steps = 0
    while not short.is_finished:
        t2v.step()
        steps += 1
    assert steps == 2 and not long.is_finished          # 3 latent frames, one per step, long kept denoising
    assert long.step_idx == 3
    while not long.is_finished:
        t2v.step()


def test_abort_while_decoding_frees_it(t2v):
    base = dict(height=32, width=32, num_frames=9, guidance_scale=1.0)
    a = t2v.add_request("a", DiffusionParams(seed=1, num_inference_steps=1, **base), output_type="np")
    b = t2v.add_request("b", DiffusionParams(seed=2, num_inference_steps=3, **base), output_type="np")
    t2v.step()
    assert t2v.engine_stats()["decoding_videos"] == 1 and t2v.abort(a.request_id)
    assert t2v.engine_stats()["decoding_videos"] == 0
    while not b.is_finished:
        t2v.step()
    assert a.images is None and b.images is not None and not t2v.has_work()


def test_tiled_decode_equals_vae(t2v):
    z = torch.randn(1, 16, 2, 8, 10, generator=torch.Generator().manual_seed(0))   # 2 latent frames: 5 frames
    job, ref = tiled_decode_pair(t2v.family.vae, z, tile=32, stride=16, frames_per_step=2)
    assert job.tiled and len(job.grid) * len(job.grid[0]) == 20
    assert job.result().shape == ref.shape == (1, 3, 5, 64, 80) and torch.equal(job.result(), ref)


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
def test_step_cache_on_video_tokens(t2v, method):
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=6, seed=3)
    full = gen(t2v, "a red fox", **kw)[0]
    before = t2v.engine_stats()["cache_skips"]
    cached = gen(t2v, "a red fox", cache={"method": method, "threshold": 5.0}, **kw)[0]
    assert t2v.engine_stats()["cache_skips"] > before
    assert cached.shape == full.shape and np.isfinite(cached).all()


@pytest.mark.parametrize("kw, param", [
    (dict(num_frames=6), "num_frames"), (dict(num_frames=200), "num_frames"), (dict(height=40), "height"),
    (dict(width=24), "width"), (dict(image=True), "image"),
])
def test_t2v_bad_input(t2v, kw, param):
    image = Image.new("RGB", (8, 8)) if kw.pop("image", None) else None
    with pytest.raises(InvalidRequestError) as e:
        t2v.add_request("a fox", DiffusionParams(**(dict(height=32, width=32) | kw)), image=image)
    assert e.value.param == param


def test_i2v_needs_an_image(i2v):
    with pytest.raises(InvalidRequestError) as e:
        i2v.add_request("a fox", DiffusionParams(height=32, width=32, num_frames=5))
    assert e.value.param == "image"
    with pytest.raises(InvalidRequestError) as e:
        i2v.add_request("a fox", DiffusionParams(height=32, width=32, num_frames=5), image=np.zeros((8, 8, 3)))
    assert e.value.param == "image"


def test_lean_block_equals_the_diffusers_block(t2v, monkeypatch):
    """The engine's blocks (fused projections, half-width RoPE) give diffusers' blocks' latents."""
    from omni_ray.dit.families import wan

    monkeypatch.setattr(wan, "supported", lambda block: False)
    plain = make_engine("tiny:wan2.1-t2v")
    assert all(type(f).__name__ == "DiffusersBlock" for f in plain.family.block_fns)
    assert all(type(f).__name__ == "WanBlock" for f in t2v.family.block_fns)
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=9, negative_prompt="dull")
    a, b = (gen(e, "a heron", "latent", **kw)[0] for e in (t2v, plain))
    assert (a - b).abs().max() < 1e-5


def test_sdpa_choice_falls_back_to_the_nearest_measured_shape():
    """A CUDA graph pads a caption to its bucket after the kernels were measured on the unpadded length: the
    choice for the nearest measured token count under the same masking applies; a forced backend always."""
    from omni_ray.dit.families.sdpa_choice import SdpaChoice

    c = SdpaChoice(24, 128, torch.device("cpu"), torch.bfloat16)
    assert c.first(1152, True) is None                              # nothing measured: torch's own order
    c.picked = {(1136, True): "cudnn", (1136, False): "flash", (4200, True): "efficient"}
    assert [c.first(n, m) for n, m in ((1136, True), (1152, True), (4224, True), (1152, False))] == \
        ["cudnn", "cudnn", "efficient", "flash"]
    c.mode = "math"
    assert c.first(1152, True) == "math"
    c.mode = "default"
    assert c.first(1152, True) is None
