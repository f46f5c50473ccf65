import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_ray.config import DiTEngineConfig, ModelConfig
from omni_ray.dit import DiTEngine


def make_engine(model: str, **kw) -> DiTEngine:
    return DiTEngine(DiTEngineConfig(model=ModelConfig(path=model), device="cpu", **kw))


@pytest.fixture(scope="session")
def pixart():
    return make_engine("tiny:pixart")


@pytest.fixture(scope="session")
def sd3():
    return make_engine("tiny:sd3", max_sequence_length=32)


@pytest.fixture(scope="session")
def pixart_llm():
    return make_engine("tiny:pixart-llm")


def fresh_scheduler(engine: DiTEngine):
    base = engine.family.base_scheduler
    return type(base).from_config(base.config)


def pixart_pipeline(engine: DiTEngine):
    from diffusers import PixArtSigmaPipeline

    f = engine.family
    pipe = PixArtSigmaPipeline(tokenizer=f.tokenizer, text_encoder=f.text_encoder, vae=f.vae,
                               transformer=f.transformer, scheduler=fresh_scheduler(engine))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(engine: DiTEngine):
    from diffusers import StableDiffusion3Pipeline

    f = engine.family
    (tok1, enc1), (tok2, enc2) = f.clip
    pipe = StableDiffusion3Pipeline(transformer=f.transformer, scheduler=fresh_scheduler(engine), vae=f.vae,
                                    text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2,
                                    text_encoder_3=f.t5[1], tokenizer_3=f.t5[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_one(engine: DiTEngine, prompt, params, **kw):
    """Images (or latents) of one request run through ``engine.step()`` alone."""
    req = engine.add_request(prompt, params, **kw)
    while not req.is_finished:
        engine.step()
    return req


def max_diff(a, b) -> float:
    a = np.stack([np.asarray(x, dtype=np.float64) for x in a])
    b = np.stack([np.asarray(x, dtype=np.float64) for x in b])
    return float(np.abs(a - b).max())


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="session")
def token2wav_ckpt(tmp_path_factory):
    """tiny:qwen2.5-omni's token2wav with spread weights (tests/dit/omni_token2wav_utils.py), built once."""
    from tests.dit.omni_token2wav_utils import spread_checkpoint
    return spread_checkpoint(tmp_path_factory.mktemp("token2wav"))


def tiled_decode_pair(vae, z: torch.Tensor, tile: int, stride: int, frames_per_step: int):
    """(VideoDecode's chunked tiled decode of latents ``z``, the VAE's own ``tiled_decode``) with the VAE's
    tiles set to ``tile`` / ``stride`` pixels for the call (restored after)."""
    from omni_ray.dit.video_decode import VideoDecode

    saved = (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height,
             vae.tile_sample_stride_width)
    try:
        vae.tile_sample_min_height = vae.tile_sample_min_width = tile
        vae.tile_sample_stride_height = vae.tile_sample_stride_width = stride
        job = VideoDecode(vae, z, untiled_max_pixels=32 * 32)
        while not job.finished:
            job.step(frames_per_step)
        return job, vae.tiled_decode(z, return_dict=False)[0]
    finally:
        (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height,
         vae.tile_sample_stride_width) = saved


def run_interpreted(check: Path) -> str:
    """Run the script ``check`` under Triton's interpreter (CPU tensors; a subprocess, since TRITON_INTERPRET is
    read when a kernel is defined); its stdout, once it exits 0."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root), str(check.parent)]))
    run = subprocess.run([sys.executable, str(check)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout
