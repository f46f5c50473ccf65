"""An AR Serve replica with tensor_parallel_size=2: the replica is rank 0 in bundle 0 of its
placement group, its worker takes bundle 1; a worker that dies fails the request in flight,
the replica reports unhealthy and Serve replaces it."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.config import ARStageConfig
from omni_ray.stages import ARRequest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

ENGINE = {"model": {"path": "tiny:qwen3"}, "device": "cpu", "enforce_eager": True,
          "cache": {"block_size": 16, "num_blocks": 128}, "scheduler": {"max_model_len": 256},
          "parallel": {"tensor_parallel_size": 2, "timeout_s": 30}}


@pytest.fixture(scope="module")
def serve_local(ray_local):
    from ray import serve

    from tests.helpers import local_serve

    with local_serve():
        yield serve


def test_tp_replica_serves_then_is_replaced_when_a_worker_dies(serve_local):
    from deployments.options import stage_options
    from deployments.stages.ar import ARDeployment

    serve = serve_local
    stage = ARStageConfig(engine=ENGINE, deployment={"health_check_period_s": 1.0,
                                                      "graceful_shutdown_timeout_s": 1.0})
    opts = stage_options("llm-tp", stage)
    assert opts["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert opts["ray_actor_options"]["num_cpus"] == 1.0
    handle = serve.run(ARDeployment.options(**opts).bind("llm-tp", stage.model_dump(), None, None),
                       name="tp-test", route_prefix=None)

    def req(rid, n=8):
        return ARRequest(rid, prompt="Hello there", params=SamplingParams(max_tokens=n, temperature=0.0,
                                                                          ignore_eos=True))

    async def main():
        out = await handle.complete.remote(req("one"))
        assert len(out["token_ids"]) == 8
        par = (await handle.stats.remote())["parallel"]
        assert par["tensor_parallel_size"] == 2 and par["healthy"] and len(par["worker_pids"]) == 1

        stream = handle.options(stream=True).generate.remote(req("long", 200))
        got = 0
        with pytest.raises(Exception, match="rank 1 of 2 is gone"):
            async for delta in stream:
                got += len(delta["token_ids"])
                if got and par["worker_pids"]:
                    os.kill(par["worker_pids"].pop(), signal.SIGKILL)   # the worker process crashes
        # Serve's health check sees the dead rank and replaces the replica (with a new worker)
        deadline = time.monotonic() + 120
        while True:
            try:
                out = await asyncio.wait_for(handle.complete.remote(req(f"after-{time.monotonic()}")), 30)
                break
            except Exception:  # noqa: BLE001 - the old replica's 503s, then the new one is starting
                assert time.monotonic() < deadline, "the replica was not replaced"
                await asyncio.sleep(1.0)
        assert len(out["token_ids"]) == 8
        assert (await handle.stats.remote())["parallel"]["healthy"]

    asyncio.run(main())
    serve.delete("tp-test")
