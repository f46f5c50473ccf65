"""Step-level continuous batching: requests join and leave between steps, each with its own
scheduler state; a request's image does not depend on its batchmates."""

import numpy as np
import pytest

from omni_ray.dit import DiffusionParams
from tests.dit.conftest import make_engine, rel_diff, run_one


def P(**kw):
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    return DiffusionParams(**kw)


@pytest.mark.parametrize("engine_name", ["pixart", "sd3"])
def test_alone_equals_in_a_mixed_batch(engine_name, request):
    eng = request.getfixturevalue(engine_name)
    target = dict(num_inference_steps=5, guidance_scale=4.0, seed=1, negative_prompt="dark")
    alone = run_one(eng, "a red fox", P(**target), output_type="latent").images[0]

    f0 = eng.runner.stats.forwards
    reqs = [eng.add_request("a red fox", P(**target), output_type="latent"),
            eng.add_request("a blue bird", P(num_inference_steps=3, guidance_scale=7.0, seed=2),
                            output_type="latent"),
            eng.add_request("a castle", P(num_inference_steps=7, guidance_scale=1.0, seed=3,
                                          num_images_per_prompt=2), output_type="latent"),
            eng.add_request("a boat", P(num_inference_steps=4, seed=4, height=48), output_type="latent")]
    while not all(r.is_finished for r in reqs):
        eng.step()
    forwards = eng.runner.stats.forwards - f0
    assert forwards < sum(r.total_steps for r in reqs)          # they really shared forwards
    assert rel_diff(reqs[0].images[0], alone) < 1e-5
    assert [r.step_idx for r in reqs] == [5, 3, 7, 4]
    assert len(reqs[2].images) == 2


def test_requests_join_between_steps(pixart):
    eng = pixart
    alone_b = run_one(eng, "a koi pond", P(num_inference_steps=4, seed=9), output_type="latent").images[0]
    a = eng.add_request("a forest path", P(num_inference_steps=6, seed=8), output_type="latent")
    eng.step()
    eng.step()
    b = eng.add_request("a koi pond", P(num_inference_steps=4, seed=9), output_type="latent")
    events = eng.step()                      # b joins a's third step
    assert {r.request_id for r, kind in events if kind == "progress"} == {a.request_id, b.request_id}
    assert eng.runner.stats.last_batch_requests == 2
    while not (a.is_finished and b.is_finished):
        eng.step()
    assert rel_diff(b.images[0], alone_b) < 1e-5


def test_resolutions_do_not_mix(pixart):
    eng = pixart
    r1 = eng.add_request("a", P(num_inference_steps=2, seed=0, height=32), output_type="latent")
    r2 = eng.add_request("b", P(num_inference_steps=2, seed=0, height=48), output_type="latent")
    while not (r1.is_finished and r2.is_finished):
        eng.step()
        assert eng.runner.stats.last_batch_requests == 1
    assert r1.images[0].shape[-2:] == (8, 8) and r2.images[0].shape[-2:] == (12, 8)


def test_max_batch_size_queues_the_rest():
    eng = make_engine("tiny:pixart", max_batch_size=2)
    reqs = [eng.add_request(f"p{i}", P(num_inference_steps=3, seed=i), output_type="latent") for i in range(3)]
    eng.step()
    st = eng.engine_stats()
    assert st["active_requests"] == 2 and st["waiting_requests"] == 1 and st["last_batch_size"] == 2
    while not all(r.is_finished for r in reqs):
        eng.step()
        assert eng.engine_stats()["last_batch_size"] <= 2
    assert eng.engine_stats()["requests_finished"] == 3


def test_abort_frees_the_slot():
    eng = make_engine("tiny:pixart", max_batch_size=1)
    a = eng.add_request("a", P(num_inference_steps=50, seed=0))
    b = eng.add_request("b", P(num_inference_steps=2, seed=1))
    eng.step()
    assert eng.engine_stats()["waiting_requests"] == 1
    assert eng.abort(a.request_id) and not eng.abort(a.request_id)
    assert a.is_finished and a.latents is None
    while not b.is_finished:
        eng.step()
    st = eng.engine_stats()
    assert st["requests_aborted"] == 1 and st["requests_finished"] == 1 and not eng.has_work()


def test_vae_decodes_in_batches():
    eng = make_engine("tiny:pixart", vae_batch_size=3)
    n0 = eng.counts["vae_batches"]
    imgs = eng.generate([f"p{i}" for i in range(4)], P(num_inference_steps=2, seed=0), use_tqdm=False)
    assert len(imgs) == 4 and eng.counts["vae_batches"] - n0 == 2          # 3 + 1


def test_vae_batches_bounded_by_pixels():
    """Larger images decode in smaller batches (the decoder's activations grow with the pixels); the
    images are the same as decoded together."""
    size = 32
    eng = make_engine("tiny:pixart", vae_batch_size=8, vae_batch_pixels=2 * size * size)
    n0 = eng.counts["vae_batches"]
    params = P(num_inference_steps=2, seed=0, height=size, width=size)
    imgs = eng.generate([f"p{i}" for i in range(5)], params, use_tqdm=False)
    assert len(imgs) == 5 and eng.counts["vae_batches"] - n0 == 3          # 2 + 2 + 1
    together = make_engine("tiny:pixart", vae_batch_size=8).generate([f"p{i}" for i in range(5)], params,
                                                                       use_tqdm=False)
    for a, b in zip(imgs, together):
        assert (np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)) <= 1).all()
