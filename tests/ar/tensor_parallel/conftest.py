"""The session's local Ray cluster for the tests of this package (rank-0 driver + workers + a Serve
replica; tests/conftest.py's ``ray_session``)."""

from __future__ import annotations

import time

import pytest
import ray


@pytest.fixture(scope="package")
def ray_local(ray_session):
    yield


def kill_worker_mid_decode(llm, prompts, max_tokens: int, match: str) -> float:
    """Start greedy requests on a tensor-parallel ``llm``, kill its rank-1 worker after a few steps,
    step until ``EngineError`` (matching ``match``) is raised; returns the seconds that took."""
    from omni_ray.ar import SamplingParams
    from omni_ray.errors import EngineError

    for i, p in enumerate(prompts):
        llm.add_request(p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), f"r{i}")
    for _ in range(3):
        llm.step()
    ray.kill(llm.runner.group.actors[0], no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=match):
        while not llm.is_finished():
            llm.step()
    return time.monotonic() - t0
