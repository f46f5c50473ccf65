"""Kill a tensor-parallel worker of an AR stage (TP=2 on CPU over gloo) while it streams, through
the HTTP app: the client gets an error, Serve replaces the replica (with a new worker), the next
requests succeed within a bounded time."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.reliability.conftest import App, base_config, small_stages, wait_until

pytest.importorskip("omni_ray.ar.executor.tensor_parallel",
                    reason="omni_ray.cluster.worker_group (tensor parallelism) is not built yet")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "omni-tp"
RECOVERY_S = 180


def tp_config() -> dict:
    cfg = small_stages(base_config(), ("llm",))
    eng = cfg["stages"]["llm"]["engine"]
    eng["parallel"] = {"tensor_parallel_size": 2, "backend": "gloo"}
    eng["cache"] = {"block_size": 16, "num_blocks": 128}
    cfg["app"]["request_timeout_s"] = 60
    return cfg


@pytest.fixture(scope="module")
def app(serve_port):
    a = App(APP, serve_port, tp_config())
    a.deploy()
    a.wait_healthy()
    yield a
    a.delete()


def parallel(app: App) -> dict:
    return app.stats()["llm"]["parallel"]


def test_kill_a_tensor_parallel_worker_while_it_streams(app):
    par = parallel(app)
    assert par["tensor_parallel_size"] == 2 and par["healthy"] and len(par["worker_pids"]) == 1
    (pid,) = par["worker_pids"]
    body = {"prompt": "go on", "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=app.url, timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)                  # the worker process crashes
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        err = json.loads(rest[-2])
        assert err["status"] == 503 and err["error"]["type"] == "engine_error", rest[-3:]

        def ok():
            r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "ignore_eos": True}, timeout=60)
            return r.status_code == 200
        wait_until(ok, RECOVERY_S, "service after a TP worker was killed", interval=1.0)
        took = time.monotonic() - t0
    par = parallel(app)
    assert par["healthy"] and par["worker_pids"] != [pid]
    print(f"\nTP worker killed mid-stream: back in service after {took:.1f}s")
