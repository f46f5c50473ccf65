"""A stage replica's process SIGKILLed (``os.kill(pid, SIGKILL)``, as the kernel's OOM killer or a
crash would, not ``ray.kill``) on an app of its own (``omni-restart``: llm and image stages), with
the default Serve health-check period of a stage (``deployment.health_check_period_s``) unless
``OMNI_RESTART_HEALTH_PERIOD_S`` sets another.

During the outage: every GET /health answers within 1 s (a bound), with 503 naming the stage once
the ingress notices; a chat sent meanwhile gets a 503 with Retry-After within the configured wait
(``app.stage_health.unavailable_wait_s``), or succeeds if a new replica came first; images (the
other stage) keep working. Then the app recovers: /health 200 and a chat succeeds. The times are
printed (``-s``) and recorded in docs/reliability.md:

    python -m pytest -s -q -p no:cacheprovider tests/reliability/test_replica_restart.py
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from deployments.ingress import timing
from tests.reliability.conftest import App, base_config, replica_actor, replica_ids, small_stages, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "omni-restart"
WAIT_S = 2.0                 # app.stage_health.unavailable_wait_s of this app
RECOVERY_S = 180             # a bound on getting back to service (not a speed claim)
CHAT = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True}
IMAGE = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 1}


def restart_config() -> dict:
    cfg = small_stages(base_config(), ("llm", "image"))
    period = float(os.environ.get("OMNI_RESTART_HEALTH_PERIOD_S", 0)) or None
    for st in cfg["stages"].values():
        st["deployment"].pop("health_check_period_s")          # the default, unless asked
        if period:
            st["deployment"]["health_check_period_s"] = period
    cfg["app"]["stage_health"] = {"unavailable_wait_s": WAIT_S, "retry_after_s": 1}
    return cfg


@pytest.fixture(scope="module")
def app(serve_port):
    a = App(APP, serve_port, restart_config())
    a.deploy()
    a.wait_healthy()
    yield a
    a.delete()


def replica_pid(name: str) -> int:
    import ray

    return ray.get(replica_actor(name).__ray_call__.remote(lambda self: os.getpid()), timeout=30)


class HealthWatch(threading.Thread):
    """GET /health every 0.1 s: (seconds since start, status, seconds it took at the ingress (its
    Server-Timing total: the proxy's hop and this machine's scheduling not included), body);
    ``client_s``: the time each took as this client saw it."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.seen, self.client_s, self.stop = url, [], [], threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        with httpx.Client(timeout=10) as c:
            while not self.stop.is_set():
                t = time.monotonic()
                try:
                    r = c.get(self.url + "/health")
                    self.client_s.append(time.monotonic() - t)
                    at_ingress = timing.parse(r.headers["server-timing"])["total"] / 1000
                    self.seen.append((t - self.t0, r.status_code, at_ingress, r.json()))
                except httpx.HTTPError as e:
                    self.seen.append((t - self.t0, None, time.monotonic() - t, repr(e)))
                time.sleep(0.1)


def test_sigkill_of_the_ar_replica(app):
    with httpx.Client(base_url=app.url, timeout=60) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.get("/health").json() == {"status": "ok"}
    (name,) = replica_ids(APP)["llm"]
    pid = replica_pid(name)
    watch = HealthWatch(app.url)
    killed_at = time.strftime("%H:%M:%S", time.localtime()) + f"{time.time() % 1:.3f}"[1:]
    os.kill(pid, signal.SIGKILL)
    watch.start()
    t0 = watch.t0
    out: dict = {}

    def chat():                                  # a request while the stage has no replica
        t = time.monotonic()
        r = httpx.post(app.url + "/v1/chat/completions", json=CHAT, timeout=120)
        out["chat"] = (r, time.monotonic() - t)

    def image():                                 # the other stage is not held up
        t = time.monotonic()
        r = httpx.post(app.url + "/v1/images/generations", json=IMAGE, timeout=120)
        out["image"] = (r, time.monotonic() - t)

    wait_until(lambda: any(s == 503 for _, s, _, _ in watch.seen), 30, "/health reporting the dead stage",
               interval=0.05)
    threads = [threading.Thread(target=chat), threading.Thread(target=image)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)

    def back():
        if not any(s == 200 and t > 0 for t, s, _, _ in watch.seen[-3:]):
            return False
        return httpx.post(app.url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
    wait_until(back, RECOVERY_S, "/health 200 and a chat after the SIGKILL", interval=0.2)
    recovered = time.monotonic() - t0
    watch.stop.set()
    watch.join(10)

    seen = watch.seen
    first_503 = next(t for t, s, _, _ in seen if s == 503)
    last_503 = max(t for t, s, _, _ in seen if s == 503)
    first_200 = next(t for t, s, _, _ in seen if s == 200 and t > last_503)
    slowest = max(d for _, _, d, _ in seen)
    r, took = out["chat"]
    print(f"\nSIGKILL of the llm replica at {killed_at} (Serve's controller log says when it noticed and how "
          f"long the new replica took to start) (health_check_period_s "
          f"{app.cfg['stages']['llm']['deployment'].get('health_check_period_s', 'default')}): "
          f"/health 503 from {first_503:.2f} s to {last_503:.2f} s, 200 at {first_200:.2f} s; "
          f"slowest /health {slowest:.3f} s at the ingress, {max(watch.client_s):.3f} s at the client, over "
          f"{len(seen)} calls; chat during the outage: {r.status_code} "
          f"in {took:.2f} s; image {out['image'][0].status_code} in {out['image'][1]:.2f} s; "
          f"service back (health 200 and a chat) {recovered:.2f} s after the kill")

    assert all(s in (200, 503) for _, s, _, _ in seen), [x for x in seen if x[1] not in (200, 503)]
    assert slowest < 1.0, "GET /health must answer within 1 s"
    bodies = [b for _, s, _, b in seen if s == 503]
    assert all("llm" in b["stages"] and "image" not in b["stages"] and b["error"]["code"] == "stage_unavailable"
               for b in bodies), bodies[:3]
    if r.status_code == 503:
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "stage_unavailable", r.text
        assert "'llm'" in r.json()["error"]["message"]
        assert took < WAIT_S + 5, "a request for a stage without a replica waits the configured bound"
    else:
        assert r.status_code == 200, r.text               # a new replica came first
    assert out["image"][0].status_code == 200, out["image"][0].text
    (new,) = replica_ids(APP)["llm"]
    assert new != name
