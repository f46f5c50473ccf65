"""Reliability and security tests: apps of their own on a local Ray cluster.

Each app (its own name, route prefix, scheduler and cache actors) is built from serve_config.yaml's
default app with tighter settings, so faults injected here (killed replicas and actors, redeploys)
never touch the session app of tests/serve. The package runs on the session's Ray cluster
(tests/conftest.py) and shares one Serve instance: one that runs already, or its own (stopped at the end).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 420
API_KEY = "omni-test-key-0123456789"
GRACE_S = 30        # graceful_shutdown_timeout_s of every deployment of these apps


def base_config() -> dict:
    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return copy.deepcopy(doc["applications"][0]["args"]["config"])


def pipeline_stages(p: dict) -> list[str]:
    """The stages a pipeline of a raw config uses (its steps', or its stage graph's)."""
    if "graph" in p:
        return [p["graph"]["model"], *p["graph"].get("stages", {}).values()]
    return [s["stage"] for s in p["steps"]]


def small_stages(cfg: dict, keep: tuple[str, ...]) -> dict:
    """``cfg`` reduced to the stages in ``keep`` (and the pipelines that only use them), each on a
    quarter CPU, with short health checks and a grace period for in-flight requests."""
    cfg["stages"] = {k: v for k, v in cfg["stages"].items() if k in keep}
    cfg["pipelines"] = {n: p for n, p in cfg["pipelines"].items() if set(pipeline_stages(p)) <= set(keep)}
    for st in cfg["stages"].values():
        st["deployment"] = {**st["deployment"], "num_cpus": 0.25, "health_check_period_s": 2,
                            "graceful_shutdown_timeout_s": GRACE_S}
    if "llm" in cfg["stages"]:
        eng = cfg["stages"]["llm"]["engine"]
        eng["scheduler"] = {**eng["scheduler"], "max_num_seqs": 64}
    cfg["app"]["ingress"] = {"num_replicas": 1, "num_cpus": 0.25, "max_ongoing_requests": 1024,
                             "graceful_shutdown_timeout_s": GRACE_S}
    return cfg


@pytest.fixture(scope="package")
def serve_port(ray_session):
    """A running Serve instance on the session's Ray cluster (shared if one is up); yields its HTTP port."""
    from tests.helpers import local_serve

    with local_serve() as port:
        yield port


class App:
    """One deployed app: its name, base URL and config; ``deploy`` (re)deploys it."""

    def __init__(self, name: str, port: int, cfg: dict):
        self.name, self.cfg = name, cfg
        self.cfg["app"]["name"] = name
        self.url = f"http://127.0.0.1:{port}/{name}"

    def deploy(self, cfg: dict | None = None, wait: bool = True) -> None:
        """Deploy (or redeploy: a rolling update) the app; ``wait=False`` returns once submitted."""
        from ray.serve.api import _run

        from deployments.app import build_app

        if cfg is not None:
            cfg["app"]["name"] = self.name       # its own scheduler and cache actors, not the default app's
            self.cfg = cfg
        _run(build_app({"config": self.cfg}), name=self.name, route_prefix=f"/{self.name}", _blocking=wait)

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"app {self.name} not healthy after {timeout_s}s")

    def stats(self, headers: dict | None = None) -> dict:
        """Each stage's engine stats, from /info (one replica per stage)."""
        info = httpx.get(self.url + "/info", headers=headers or {}, timeout=30).json()
        return {k: v["stats"] for k, v in info["stages"].items()}

    def delete(self) -> None:
        from ray import serve

        from omni_ray.cluster.admission.actor import kill_scheduler
        from omni_ray.cluster.dit_cache import kill_cache

        serve.delete(self.name)
        kill_scheduler(self.name)
        kill_cache(self.name)


def replica_ids(app: str) -> dict[str, set[str]]:
    """The replica actor names of every deployment of ``app`` (each carries a unique replica id,
    so a restarted or replaced replica shows up as a new name)."""
    import ray

    out: dict[str, set[str]] = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if name.startswith(f"SERVE_REPLICA::{app}#"):
            out.setdefault(name.split("#")[1], set()).add(name)
    return out


def replica_actor(name: str):
    import ray

    return ray.get_actor(name, namespace="serve")


def wait_until(pred, timeout_s: float, what: str, interval: float = 0.25):
    """Poll ``pred()`` until truthy (returns it) or fail after ``timeout_s`` (a bound, not a speed claim)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as err:  # noqa: BLE001 - keep polling; report the last state
            last = err
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout_s}s (last: {last!r})")


# ----------------------------------------------------------------------------- the guarded app
GUARD_LIMITS = {"max_body_bytes": 65536, "max_prompt_tokens": 200, "max_tokens": 16, "max_n": 2, "max_prompts": 4,
                "max_stop_sequences": 2, "max_image_pixels": 64 * 64, "max_steps": 3, "max_images": 2}


def guard_config() -> dict:
    """Every stage and pipeline of the default app, behind an API key and tight limits (so any
    input the fuzzer or the load test sends stays cheap on a CPU)."""
    cfg = small_stages(base_config(), ("llm", "image", "image-llm"))
    cfg["app"].update(api_keys=[API_KEY], limits=GUARD_LIMITS, request_timeout_s=300)
    cfg["pipelines"]["text2image"]["steps"][0]["max_tokens"] = 8
    cfg["scheduler"]["max_queue_size"] = 8           # small: the load test sees 429s too
    cfg["dit_cache"].update(cache_conditioning=False, cache_images=True)   # cache keys from seeded requests only
    return cfg


@pytest.fixture(scope="package")
def guard(serve_port):
    app = App("omni-guard", serve_port, guard_config())
    t0 = time.monotonic()
    app.deploy()
    app.wait_healthy()
    print(f"\nomni-guard up in {time.monotonic() - t0:.1f}s")
    yield app
    app.delete()


@pytest.fixture(scope="package")
def guard_client(guard):
    with httpx.Client(base_url=guard.url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c
