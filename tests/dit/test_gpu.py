"""GPU paths: CUDA graphs and fused elementwise kernels give the eager results."""

import pytest
import torch

from omni_ray.config import DiTEngineConfig, ModelConfig
from omni_ray.dit import DiffusionParams, DiTEngine
from tests.dit.conftest import rel_diff, run_one

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_engine(model="tiny:pixart", dtype="float32", **kw):
    return DiTEngine(DiTEngineConfig(model=ModelConfig(path=model, dtype=dtype), device="cuda", **kw))


@pytest.mark.parametrize("model", ["tiny:pixart", "tiny:sd3"])
@pytest.mark.parametrize("cache", [None, {"method": "fbcache", "threshold": 0.3},
                                   {"method": "teacache", "threshold": 0.3}])
def test_graphs_and_fused_kernels_match_eager(model, cache):
    torch.backends.cuda.matmul.allow_tf32 = False
    fast = cuda_engine(model)
    eager = cuda_engine(model, cuda_graphs=False, fuse_elementwise=False)
    params = [DiffusionParams(height=32, width=32, num_inference_steps=n, seed=i, cache=cache)
              for i, n in enumerate((6, 4, 5))]
    outs = []
    for eng in (fast, eager):
        reqs = [eng.add_request(f"prompt {i}", p, output_type="latent") for i, p in enumerate(params)]
        while not all(r.is_finished for r in reqs):
            eng.step()
        outs.append([r.images[0] for r in reqs])
    assert fast.runner.graphs.replays > 0 and eager.runner.graphs is None
    for a, b in zip(*outs):
        assert rel_diff(a, b) < 1e-3


def test_bf16_engine_runs_and_batches():
    eng = cuda_engine(dtype="auto")
    assert eng.dtype == torch.bfloat16
    imgs = eng.generate([f"p{i}" for i in range(6)], DiffusionParams(height=64, width=64, num_inference_steps=4,
                                                                     seed=0), use_tqdm=False)
    assert len(imgs) == 6 and imgs[0].size == (64, 64)
    assert eng.engine_stats()["max_batch_size"] == 6
    req = run_one(eng, "a cat", DiffusionParams(height=32, width=32, num_inference_steps=3, seed=1,
                                                cache="teacache"))
    assert len(req.images) == 1


def test_qwen_image_attention_kernel_measured_per_mask():
    """Qwen-Image on CUDA (bf16): two captions of different lengths in one batch run the joint attention
    under a caption mask, one alone without; the engine times the SDPA kernels per (tokens, masked) and runs
    the fastest (cuDNN takes the mask, flash does not); the latents stay those of torch's own order."""
    fast = cuda_engine("tiny:qwen-image", dtype="bfloat16")
    ref = cuda_engine("tiny:qwen-image", dtype="bfloat16", attention_backend="default")
    dim = fast.family.transformer.config.joint_attention_dim
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(n, dim, generator=g) for n in (7, 12)]
    params = DiffusionParams(height=32, width=32, num_inference_steps=3, seed=0)
    outs = []
    for eng in (fast, ref):
        together = [eng.add_request(None, params, prompt_embeds=e, output_type="latent") for e in embeds]
        while not all(r.is_finished for r in together):
            eng.step()
        alone = run_one(eng, None, params, prompt_embeds=embeds[0], output_type="latent")
        outs.append([r.images[0] for r in together] + [alone.images[0]])
    assert {masked for _, masked in fast.family.sdpa.picked} == {True, False}
    assert not ref.family.sdpa.picked
    for a, b in zip(*outs):
        assert rel_diff(a.float(), b.float()) < 3e-2
