"""Serve autoscaling of a stage, on the real app over a local Ray cluster.

The ``llm`` stage of serve_config.yaml (tiny Qwen3 on CPU) gets autoscaling bounds 1..2 with a
target of 2 requests in flight per replica and short delays. Six HTTP clients keep ~6 chat
completions in flight, so the autoscaler must add a replica; when they stop it must go back
to one. Replica counts come from ``serve.status()``.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray import serve

from omni_ray.config import load_config

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
APP = "omni-autoscale"
CLIENTS = 6          # requests kept in flight: 3x the target of one replica
WAIT_S = 90          # give-up time for each scaling step (a wait, not a speed assertion)
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
               "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}


def autoscaling_config() -> dict:
    """serve_config.yaml's app reduced to the ``llm`` stage and the ``chat`` pipeline."""
    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    cfg = copy.deepcopy(doc["applications"][0]["args"]["config"])
    llm = cfg["stages"]["llm"]
    llm["deployment"] = {"max_ongoing_requests": 16, "num_cpus": 0.25, "graceful_shutdown_timeout_s": 2,
                         "autoscaling": AUTOSCALING}
    cfg["stages"] = {"llm": llm}
    cfg["pipelines"] = {"chat": cfg["pipelines"]["chat"]}
    cfg["app"]["ingress"] = {"num_replicas": 1, "num_cpus": 0.25, "max_ongoing_requests": 256}
    cfg["app"]["name"] = APP   # its own scheduler and cache actors
    load_config(cfg)  # fail here, clearly, if the config tree moved
    return cfg


@pytest.fixture(scope="module")
def app_url(ray_session):
    """Its own app on its own route prefix, on the session's Ray cluster and the Serve instance other
    tests of the session already started (left running), or a Serve instance of its own."""
    from deployments.app import build_app
    from tests.helpers import local_serve

    with local_serve() as port:
        cfg = autoscaling_config()
        serve.run(build_app({"config": cfg}), name=APP, route_prefix=f"/{APP}")
        yield f"http://127.0.0.1:{port}/{APP}", cfg["stages"]["llm"]["engine"]["model"]["name"]
        serve.delete(APP)


def running_replicas(deployment: str = "llm") -> int:
    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_for(pred, what: str) -> list[int]:
    """Poll the replica count until ``pred(count)``; returns the counts seen."""
    seen, deadline = [], time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        seen.append(running_replicas())
        if pred(seen[-1]):
            return seen
        time.sleep(0.5)
    pytest.fail(f"{what}: llm replicas never got there in {WAIT_S}s (seen {sorted(set(seen))})")


class Load:
    """``CLIENTS`` threads, each sending chat completions back to back until stopped."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model
        self.stop = threading.Event()
        self.codes: list[int] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, i: int) -> None:
        body = {"model": self.model, "max_tokens": 48, "ignore_eos": True, "temperature": 1.0,
                "messages": [{"role": "user", "content": f"client {i}: tell me a long story"}]}
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    self.codes.append(client.post(f"{self.url}/v1/chat/completions", json=body).status_code)
                except httpx.HTTPError:
                    self.codes.append(-1)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_stage_scales_up_under_load_and_back_down(app_url):
    url, model = app_url
    assert running_replicas() == AUTOSCALING["min_replicas"]

    t0 = time.monotonic()
    with Load(url, model) as load:
        wait_for(lambda n: n >= 2, "scale up under load")
        t_up = time.monotonic() - t0
    assert load.codes and set(load.codes) == {200}, f"load requests failed: {sorted(set(load.codes))}"

    t0 = time.monotonic()
    wait_for(lambda n: n == AUTOSCALING["min_replicas"], "scale down after load")
    print(f"llm replicas 1 -> 2 in {t_up:.1f}s under {CLIENTS} clients ({len(load.codes)} requests), "
          f"2 -> 1 in {time.monotonic() - t0:.1f}s after the load stopped")
