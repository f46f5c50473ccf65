"""Wan video under CFG parallel, Ulysses sequence parallel over the frame-height-width tokens, and
both (CPU, gloo, ranks 1.. as Ray actors): frames equal the single-process engine's, for T2V, I2V
(the first frame's channels and CLIP states on every rank), Wan2.2's two experts (switched at the
boundary inside the parallel forward) and Wan2.2 TI2V (image and text rows: per-token timesteps whose
first-frame tokens fall on one shard or across shards)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omni_ray.config import DiTEngineConfig, ModelConfig
from omni_ray.dit import DiffusionParams, DiTEngine
from omni_ray.dit.parallel.rank import decode_meta, encode_meta
from omni_ray.errors import ConfigError

TOL = 1e-4                                 # on [0, 1] frames (fp32; batched-kernel rounding only)
LAYOUTS = {"cfg2": {"cfg_parallel": True}, "sp2": {"sequence_parallel_size": 2},
           "cfg2xsp2": {"cfg_parallel": True, "sequence_parallel_size": 2}}


def config(model: str, parallel: dict) -> DiTEngineConfig:
    return DiTEngineConfig(model=ModelConfig(path=model), device="cpu", parallel=parallel)


def first_frame() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype("uint8"))


def requests(model: str) -> list[tuple[str, DiffusionParams, dict]]:
    """Three videos. The first two share forwards (a CFG pair with a negative prompt + a request without
    CFG: 3 rows, an odd number for the CFG split; 2 x 2 x 3 = 12 tokens each); the third is alone
    (3 x 3 x 3 = 27 tokens: an uneven 14 + 13 sequence split). Wan2.2: 4 steps, two on each expert.
    TI2V (stride 32: twice the sizes, the same token grids): a first frame on the first and third only."""
    steps = 4 if "t2v" in model and "2.2" in model else 2
    s = 2 if "ti2v" in model else 1
    kw = {"image": first_frame()} if "i2v" in model else {}
    return [("a red fox in the snow", DiffusionParams(height=32 * s, width=48 * s, num_frames=5,
                                                      num_inference_steps=steps, guidance_scale=5.0,
                                                      negative_prompt="blurry", seed=0), kw),
            ("a lighthouse", DiffusionParams(height=32 * s, width=48 * s, num_frames=5, num_inference_steps=steps,
                                             guidance_scale=1.0, seed=1), {} if s == 2 else kw),
            ("a koi pond", DiffusionParams(height=48 * s, width=48 * s, num_frames=9, num_inference_steps=steps,
                                           guidance_scale=3.0, seed=2), kw)]


def videos(engine: DiTEngine, model: str) -> list[np.ndarray]:
    reqs = [engine.add_request(p, params, output_type="np", **kw) for p, params, kw in requests(model)]
    while not all(r.is_finished for r in reqs):
        engine.step()
    return [np.asarray(r.images[0]) for r in reqs]


_reference: dict[str, list[np.ndarray]] = {}


def reference(model: str) -> list[np.ndarray]:
    """The single-process engine's videos (the ground truth), made once per model."""
    if model not in _reference:
        _reference[model] = videos(DiTEngine(config(model, {})), model)
    return _reference[model]


def assert_same(got: list[np.ndarray], ref: list[np.ndarray]) -> None:
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert [g.shape[:2] for g in got] == [(5, 32), (5, 32), (9, 48)] or [g.shape[:2] for g in got] == [
        (5, 64), (5, 64), (9, 96)]
    for g, r in zip(got, ref):
        assert float(np.std(r)) > 0.01 and np.abs(g - r).max() < TOL


# ----------------------------------------------------------------------------- without Ray
def test_video_step_header_round_trip():
    """5-D latents (I2V: 16 + 20 channels) and the (frames, rows, columns) patch grid fit one header."""
    meta = {"x": ((3, 36, 21, 60, 104), torch.float32), "t": ((3,), torch.float32),
            "cond": {"ctx": ((3, 512, 4096), torch.bfloat16), "bias": None, "pooled": ((3, 257, 1280), torch.bfloat16)},
            "shapes": ((21, 30, 52),)}
    assert decode_meta(np.asarray(encode_meta(meta))) == meta


def test_wan_sequence_parallel_refuses_heads_it_cannot_split():
    with pytest.raises(ConfigError, match="attention heads"):                  # tiny Wan: 2 heads
        DiTEngine(config("tiny:wan2.1-t2v", {"sequence_parallel_size": 4}))


# ----------------------------------------------------------------------------- on Ray
# T2V under CFG parallel and under cfg 2 x sequence 2 (both kinds of split in one forward; the 4-rank
# layout once, CI time); sequence parallel alone on I2V (36 latent channels, CLIP states in the caption
# rows), Wan2.2 (the high- and low-noise experts, switched on every rank at once) and TI2V (per-token
# timesteps split with the shards). Each engine start costs CI ~10 s of worker start-up.
CASES = [("tiny:wan2.1-t2v", "cfg2"), ("tiny:wan2.1-t2v", "cfg2xsp2"), ("tiny:wan2.1-i2v", "sp2"),
         ("tiny:wan2.2-t2v", "sp2"), ("tiny:wan2.2-ti2v", "sp2")]


@pytest.mark.ray
@pytest.mark.parametrize("model,layout", CASES)
def test_wan_parallel_equals_single_process(ray_up, model, layout):
    engine = DiTEngine(config(model, LAYOUTS[layout]))
    try:
        assert engine.engine_stats()["parallel_ranks"] == {"cfg2": 2, "sp2": 2, "cfg2xsp2": 4}[layout]
        if "2.2-t2v" in model:
            assert len(engine.family.experts) == 2 and engine.family.boundary_timestep is not None
        assert_same(videos(engine, model), reference(model))
    finally:
        engine.shutdown()


# ----------------------------------------------------------------------------- on GPUs (NCCL)
@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.parametrize("layout", ["cfg2", "sp2"])
def test_wan_parallel_on_gpus_equals_one_gpu(ray_up, layout):
    """The same on 2 GPUs over NCCL, in float32 (the patch embedding's and VAE's cuDNN convolutions may
    pick other TF32 algorithms for other row counts: a looser bound than on the CPU)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    model = "tiny:wan2.1-t2v"

    def engine(parallel):
        return DiTEngine(DiTEngineConfig(model=ModelConfig(path=model, dtype="float32"), device="cuda",
                                         parallel=parallel))
    single = engine({})
    ref = videos(single, model)
    del single
    par = engine(LAYOUTS[layout])
    try:
        assert par.engine_stats()["parallel"]["backend"] == "nccl"
        got = videos(par, model)
    finally:
        par.shutdown()
    for g, r in zip(got, ref):
        assert g.shape == r.shape and float(np.std(r)) > 0.01 and np.abs(g - r).max() < 1e-2
