"""TeaCache on Wan: the published TeaCache4Wan2.1 polynomial per checkpoint (from its transformer config,
I2V by the request's resolution), fitted on the timestep embedding, which is what the engine then watches."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from omni_ray.dit import DiffusionParams
from omni_ray.dit.families import WanFamily
from omni_ray.dit.families import wan_teacache as tc
from omni_ray.dit.step_cache import relative_l1, rescale
from omni_ray.testing.tiny_wan import WAN21_I2V_14B, WAN21_T2V_1_3B, WAN21_T2V_14B, WAN22_TI2V_5B
from tests.dit.conftest import make_engine


@pytest.fixture(scope="module")
def t2v():
    return make_engine("tiny:wan2.1-t2v")


@pytest.mark.parametrize("cfg, experts, hw, poly", [
    (WAN21_T2V_1_3B, 1, (480, 832), tc.T2V_1_3B), (WAN21_T2V_14B, 1, (720, 1280), tc.T2V_14B),
    (WAN21_T2V_14B, 1, (480, 832), tc.T2V_14B),                      # T2V fits do not depend on the size
    (WAN21_I2V_14B, 1, (480, 832), tc.I2V_14B_480P), (WAN21_I2V_14B, 1, (832, 480), tc.I2V_14B_480P),
    (WAN21_I2V_14B, 1, (720, 1280), tc.I2V_14B_720P), (WAN21_I2V_14B, 1, (704, 1280), tc.I2V_14B_720P),
    (WAN21_T2V_14B, 2, (720, 1280), None),                           # Wan2.2 A14B: the 14B config, other weights
    (WAN22_TI2V_5B, 1, (704, 1280), None),
])
def test_published_polynomial_per_checkpoint(cfg, experts, hw, poly):
    assert tc.wan_polynomial(cfg, experts, *hw) == poly


def test_polynomials_apply_as_published_up_to_their_first_peak():
    """The 1.3B fit dips near 0 before it rises: applied as published there (not cut at 0); past its first
    peak a large change still counts as large. Qwen-Image's fit (rising from 0) keeps its cut."""
    from omni_ray.dit.families import QwenImageFamily

    for poly, d in [(tc.T2V_1_3B, 0.01), (tc.T2V_1_3B, 0.1), (tc.T2V_14B, 0.1), (tc.I2V_14B_480P, 0.3),
                    (tc.I2V_14B_720P, 0.2)]:
        assert rescale(d, poly) == pytest.approx(float(np.polyval(poly, d)))
    assert float(np.polyval(tc.T2V_1_3B, 0.25)) < 0 < rescale(0.25, tc.T2V_1_3B)
    assert rescale(0.4, QwenImageFamily.teacache_coefficients) >= 0.4


def test_the_family_picks_it_from_its_transformer_config(t2v):
    """A family over the real 1.3B / I2V-14B transformer configs (meta weights) picks their fits; the tiny
    checkpoint (no published fit) gets none."""
    from diffusers import WanTransformer3DModel

    comps = {"vae": t2v.family.vae, "scheduler": t2v.family.base_scheduler}
    for cfg, poly in [(WAN21_T2V_1_3B, tc.T2V_1_3B), (WAN21_I2V_14B, tc.I2V_14B_480P)]:
        with torch.device("meta"):
            tr = WanTransformer3DModel(**cfg)
        fam = WanFamily(comps | {"transformer": tr}, torch.device("cpu"), torch.float32, None)
        assert fam.teacache_polynomial(SimpleNamespace(height=480, width=832)) == poly
    assert t2v.family.teacache_polynomial(SimpleNamespace(height=480, width=832)) is None


def test_engine_watches_the_timestep_embedding(t2v, monkeypatch):
    """With the 1.3B polynomial, the engine's skip decisions are TeaCache4Wan2.1's rule on the time embedding
    of the request's timesteps (first and last steps computed, accumulate the rescaled distance, skip while
    under the threshold)."""
    from omni_ray.dit import runner

    monkeypatch.setattr(t2v.family, "teacache_polynomial", lambda r: tc.T2V_1_3B)
    steps = 10
    sched = t2v.family.new_scheduler(steps, 32, 32)
    emb = t2v.family.transformer.condition_embedder
    e = [emb.time_embedder(emb.timesteps_proj(torch.tensor([float(t)]))) for t in sched.timesteps]
    d = [rescale(float(relative_l1(e[i], e[i - 1])), tc.T2V_1_3B) for i in range(1, steps - 1)]
    threshold = float(np.median(d)) * 1.5
    expected, acc = [False], 0.0
    for x in d:
        acc += x
        expected.append(acc < threshold)
        acc = acc if expected[-1] else 0.0
    expected.append(False)
    assert any(expected) and not all(expected[1:-1])                # a mixed pattern: it can tell signals apart

    seen = []
    decide = runner.decide

    def recording(states, signals, forced):
        out = decide(states, signals, forced)
        seen.append(out[0])
        return out

    monkeypatch.setattr(runner, "decide", recording)
    video = t2v.generate("a red fox", DiffusionParams(height=32, width=32, num_frames=5, num_inference_steps=steps,
                                                      seed=3, cache={"method": "teacache", "threshold": threshold}),
                         output_type="np", use_tqdm=False)[0]
    assert seen == expected and np.isfinite(video).all()


def test_teacache_runs_on_ti2v_image_and_text_rows():
    """Per-token timesteps: the signal is the other frames' time embedding; a mixed batch still skips."""
    eng = make_engine("tiny:wan2.2-ti2v")
    image = Image.fromarray((np.random.default_rng(2).random((40, 60, 3)) * 255).astype("uint8"))
    kw = dict(height=64, width=96, num_frames=5, num_inference_steps=6, cache={"method": "teacache", "threshold": 5.0})
    reqs = [eng.add_request("a boat", DiffusionParams(seed=1, **kw), output_type="np", image=image),
            eng.add_request("a boat", DiffusionParams(seed=2, **kw), output_type="np")]
    while not all(r.is_finished for r in reqs):
        eng.step()
    assert all(r.cache_skips > 0 and np.isfinite(r.images[0]).all() for r in reqs)
