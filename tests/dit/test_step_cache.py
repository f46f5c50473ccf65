"""Step caching: fewer block evaluations, bounded deviation, decisions per sample in one batch."""

import numpy as np
import pytest

from omni_ray.dit import DiffusionParams, StepCacheParams
from omni_ray.errors import InvalidRequestError
from tests.dit.conftest import rel_diff, run_one

STEPS = 12


def P(cache=None, seed=3, **kw):
    return DiffusionParams(height=32, width=32, num_inference_steps=STEPS, seed=seed, cache=cache, **kw)


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-20))


@pytest.mark.parametrize("engine_name", ["pixart", "sd3"])
@pytest.mark.parametrize("method, threshold", [("fbcache", 0.3), ("teacache", 0.3)])
def test_cache_saves_blocks_with_bounded_deviation(engine_name, method, threshold, request):
    eng = request.getfixturevalue(engine_name)
    n_blocks = len(eng.family.blocks)
    base = run_one(eng, "a red fox", P(), output_type="np")
    cached = run_one(eng, "a red fox", P({"method": method, "threshold": threshold}), output_type="np")
    assert base.block_evals == STEPS * n_blocks and base.cache_skips == 0
    assert 0 < cached.cache_skips <= STEPS - 2                  # first and last step always run
    assert cached.block_evals < base.block_evals
    assert psnr(cached.images[0], base.images[0]) > 25          # close to the uncached image ...
    assert psnr(cached.images[0], base.images[0]) < 200         # ... but not the same computation


def test_tiny_threshold_reproduces_uncached(pixart):
    base = run_one(pixart, "a red fox", P(), output_type="latent")
    cached = run_one(pixart, "a red fox", P({"method": "fbcache", "threshold": 1e-9}), output_type="latent")
    assert cached.cache_skips == 0 and rel_diff(cached.images[0], base.images[0]) < 1e-5


def test_per_sample_decisions_inside_one_batch(pixart):
    """One sample reuses while its batchmate recomputes, in the same forwards; each ends as it
    would alone."""
    eng = pixart
    reuse = {"method": "fbcache", "threshold": 10.0}          # always reuse when allowed
    recompute = {"method": "fbcache", "threshold": 1e-9}      # never reuse
    alone_reuse = run_one(eng, "a red fox", P(reuse), output_type="latent").images[0]
    alone_base = run_one(eng, "a blue bird", P(seed=4), output_type="latent").images[0]

    f0, s0 = eng.runner.stats.forwards, eng.runner.stats.cache_skips
    a = eng.add_request("a red fox", P(reuse), output_type="latent")
    b = eng.add_request("a blue bird", P(recompute, seed=4), output_type="latent")
    while not (a.is_finished and b.is_finished):
        eng.step()
        assert eng.runner.stats.last_batch_requests == 2
    assert eng.runner.stats.forwards - f0 == STEPS              # every step ran both together
    assert a.cache_skips == STEPS - 2 and b.cache_skips == 0    # so on steps 1..10 one reused, one recomputed
    assert eng.runner.stats.cache_skips - s0 == STEPS - 2
    n_blocks = len(eng.family.blocks)
    assert a.block_evals == 2 * n_blocks + (STEPS - 2) and b.block_evals == STEPS * n_blocks
    assert rel_diff(a.images[0], alone_reuse) < 1e-5
    assert rel_diff(b.images[0], alone_base) < 1e-5


def test_mixed_methods_in_one_batch_match_alone(sd3):
    eng = sd3
    specs = [("a", None, 1), ("b", {"method": "teacache", "threshold": 0.5}, 2),
             ("c", {"method": "fbcache", "threshold": 0.5}, 3)]
    alone = [run_one(eng, p, P(c, seed=s), output_type="latent").images[0] for p, c, s in specs]
    reqs = [eng.add_request(p, P(c, seed=s), output_type="latent") for p, c, s in specs]
    while not all(r.is_finished for r in reqs):
        eng.step()
    for r, ref in zip(reqs, alone):
        assert rel_diff(r.images[0], ref) < 1e-5
    assert reqs[1].cache_skips > 0 and reqs[2].cache_skips > 0


@pytest.mark.parametrize("spec", ["magic", {"method": "teacache", "threshold": -1}, {"method": "nope"},
                                  {"method": "fbcache", "threshold": 0.1, "extra": 1}, 42])
def test_bad_cache_settings(spec):
    with pytest.raises(InvalidRequestError) as err:
        DiffusionParams(cache=spec)
    assert err.value.param.startswith("cache")


def test_cache_spec_forms():
    assert StepCacheParams.parse(None) is None and StepCacheParams.parse("off") is None
    assert StepCacheParams.parse({"method": "off"}) is None
    assert StepCacheParams.parse("teacache").method == "teacache"
    assert StepCacheParams.parse({"method": "fbcache", "threshold": 0.2}) == StepCacheParams("fbcache", 0.2)
