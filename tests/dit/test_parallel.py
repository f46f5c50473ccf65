"""Parallel DiT (CFG parallel, Ulysses sequence parallel, both) on CPU: ranks 1.. are Ray actors,
collectives over gloo. The images must equal the single-process engine's; bad layouts are
ConfigErrors before anything starts; a dead rank fails the engine with EngineError, never hangs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import ray
import torch

from omni_ray.config import DiTEngineConfig, ModelConfig
from omni_ray.dit import DiffusionParams, DiTEngine
from omni_ray.dit.parallel import Layout
from omni_ray.dit.parallel.rank import decode_meta, encode_meta
from omni_ray.errors import ConfigError, EngineError, InvalidRequestError

from .conftest import rel_diff

PROMPTS = ["a red fox in the snow", "a lighthouse", "a cat wearing sunglasses"]


def config(model: str, parallel: dict, **kw) -> DiTEngineConfig:
    if "sd3" in model:
        kw.setdefault("max_sequence_length", 32)
    return DiTEngineConfig(model=ModelConfig(path=model), device="cpu", parallel=parallel, **kw)


def mixed_params(sizes=(64, 64, 48)) -> list[DiffusionParams]:
    """CFG and non-CFG requests (an odd number of rows), two resolutions (48 px: 9 tokens, an
    uneven 5 + 4 sequence split)."""
    return [DiffusionParams(height=s, width=s, num_inference_steps=4, seed=i, guidance_scale=g)
            for i, (s, g) in enumerate(zip(sizes, (4.5, 1.0, 3.0)))]


def latents(engine: DiTEngine, params) -> list[torch.Tensor]:
    out = engine.generate(PROMPTS[:len(params)], params, output_type="latent", use_tqdm=False)
    return [torch.as_tensor(o) for o in out]


def assert_same(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert rel_diff(g, r) < 1e-5          # fp32; batched-kernel rounding only


@pytest.fixture(scope="module")
def reference():
    """Single-process engines (the ground truth)."""
    return {m: DiTEngine(config(m, {})) for m in ("tiny:pixart", "tiny:sd3")}


# ----------------------------------------------------------------------------- without Ray
def test_layout_splits_rows_and_tokens():
    lay = Layout(cfg=2, sp=2)
    assert lay.world == 4 and [lay.cfg_index(r) for r in range(4)] == [0, 0, 1, 1]
    assert lay.sp_ranks(1) == [2, 3]
    assert lay.row_index(5, 0, "cpu").tolist() == [0, 1, 2]
    assert lay.row_index(5, 1, "cpu").tolist() == [3, 4, 4]          # padded with the last row
    assert lay.row_index(2, 1, "cpu").tolist() == [1]                 # a lone CFG pair: one half each
    assert lay.token_counts(9) == [5, 4] and Layout(1, 4).token_counts(6) == [2, 2, 1, 1]


def test_step_header_round_trip():
    meta = {"x": ((3, 4, 8, 8), torch.bfloat16), "t": ((3,), torch.float32),
            "cond": {"ctx": ((3, 7, 32), torch.bfloat16), "bias": None, "pooled": ((3, 32), torch.float16)},
            "shapes": ((1, 4, 6), (1, 8, 8))}
    values = encode_meta(meta)
    assert len(values) <= 62                                           # fits one WorkerGroup.post
    assert decode_meta(np.asarray(values)) == meta
    meta["cond"] = None
    assert decode_meta(encode_meta(meta)) == meta


def test_bad_layouts_are_config_errors():
    # tiny models have 2 heads: Ulysses cannot split them 3 or 4 ways; refused before any worker starts
    for sp in (3, 4):
        with pytest.raises(ConfigError, match="attention heads"):
            DiTEngine(config("tiny:pixart", {"sequence_parallel_size": sp}))
    with pytest.raises(ConfigError, match="compile"):
        DiTEngine(config("tiny:pixart", {"sequence_parallel_size": 2}, compile=True))


# ----------------------------------------------------------------------------- on Ray
def test_cfg_parallel_equals_single_process(ray_up, reference):
    ref_engine = reference["tiny:pixart"]
    engine = DiTEngine(config("tiny:pixart", {"cfg_parallel": True}))
    try:
        assert engine.engine_stats()["parallel_ranks"] == 2
        assert_same(latents(engine, mixed_params()), latents(ref_engine, mixed_params()))
        # through the VAE on rank 0: pixels too
        p = DiffusionParams(height=64, width=64, num_inference_steps=3, seed=7)
        got = engine.generate("a koi pond", p, output_type="np", use_tqdm=False)
        ref = ref_engine.generate("a koi pond", p, output_type="np", use_tqdm=False)
        assert np.abs(np.asarray(got[0]) - np.asarray(ref[0])).max() < 1e-4
        # step caching is refused clearly (400), the engine keeps working
        with pytest.raises(InvalidRequestError, match="step caching") as err:
            engine.make_request("a fox", DiffusionParams(height=64, width=64, cache={"method": "teacache"}))
        assert err.value.param == "cache" and err.value.http_status == 400
        engine.check_health()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("parallel", [{"cfg_parallel": True}, {"cfg_parallel": True, "sequence_parallel_size": 2}])
def test_qwen_image_parallel_equals_single_process(ray_up, parallel):
    """Packed latents, true CFG with a negative of another length (a caption mask), a request
    without CFG beside it (an odd number of rows); Ulysses over the image tokens (6 and 9 per image:
    even and uneven splits; the caption whole on each rank)."""
    ref_engine = DiTEngine(config("tiny:qwen-image", {}))
    engine = DiTEngine(config("tiny:qwen-image", parallel))
    g = torch.Generator().manual_seed(0)
    dim = ref_engine.family.caption_dim
    embeds = [torch.randn(n, dim, generator=g) for n in (9, 6, 11)]
    negs = [torch.randn(4, dim, generator=g), None, torch.randn(11, dim, generator=g)]
    params = [DiffusionParams(height=h, width=48, num_inference_steps=3, seed=i) for i, h in enumerate((32, 48, 32))]

    def run(eng):
        out = eng.generate(None, params, prompt_embeds=embeds, negative_prompt_embeds=negs, output_type="latent",
                           use_tqdm=False)
        return [torch.as_tensor(o) for o in out]
    try:
        assert_same(run(engine), run(ref_engine))
    finally:
        engine.shutdown()


def test_sequence_parallel_equals_single_process(ray_up, reference):
    engine = DiTEngine(config("tiny:pixart", {"sequence_parallel_size": 2}))
    try:
        assert_same(latents(engine, mixed_params()), latents(reference["tiny:pixart"], mixed_params()))
    finally:
        engine.shutdown()


def test_sd3_cfg_and_sequence_parallel_equals_single_process(ray_up, reference):
    """4 ranks: two CFG row groups, each split over 2 sequence ranks; SD3's joint attention."""
    engine = DiTEngine(config("tiny:sd3", {"cfg_parallel": True, "sequence_parallel_size": 2}))
    try:
        assert engine.engine_stats()["parallel_ranks"] == 4
        params = mixed_params((64, 48))
        assert_same(latents(engine, params), latents(reference["tiny:sd3"], params))
    finally:
        engine.shutdown()


def test_dead_rank_fails_requests_and_health(ray_up):
    from omni_ray.dit.async_engine import AsyncDiTEngine

    async def scenario():
        engine = AsyncDiTEngine(config("tiny:pixart", {"cfg_parallel": True}, max_steps=1000))
        try:
            params = DiffusionParams(height=64, width=64, num_inference_steps=1000, seed=0)   # outlives the kill
            stream = engine.generate("a red fox", params, "r1")
            assert (await stream.__anext__()).kind == "progress"
            ray.kill(engine.engine.parallel.workers.actors[0], no_restart=True)
            with pytest.raises(EngineError):
                async for _ in stream:                     # in flight: fails, does not hang
                    pass
            with pytest.raises(EngineError):
                engine.check_health()
            with pytest.raises(EngineError):               # new requests are refused
                async for _ in engine.generate("a cat", params, "r2"):
                    pass
            with pytest.raises(EngineError):
                engine.engine.make_request("a cat", params)
        finally:
            await engine.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))         # a hang guard, not a speed check
