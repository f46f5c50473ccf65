"""Faults on apps of their own (the llm and image stages, chat / image / text2image pipelines):
client disconnects, killed replicas and cluster-service actors, a redeploy with requests in
flight and a shutdown (``omni-faults``), request timeouts (``omni-timeouts``: a 2 s deadline).
After each fault the next requests must succeed within a bounded time and every engine must let
go of what the failed requests held. "Long" requests are sized so that no CPU finishes them
within the disconnect / timeout (8 choices x 900 tokens; 512 px images, 100 steps, 4 images).

Tests run in file order (the shutdown deletes the app). Times to recovery are printed (-s).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import ray

from tests.reliability.conftest import GRACE_S, App, base_config, replica_actor, replica_ids, small_stages, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP, SLOW_APP = "omni-faults", "omni-timeouts"
RECOVERY_S = 180          # the bound on getting back to service after a fault (not a speed claim)
SHORT = {"model": "tiny-qwen3", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
LONG1 = {"model": "tiny-qwen3", "prompt": "go on", "max_tokens": 900, "ignore_eos": True}
LONG = {**LONG1, "n": 8}                                     # 7200 tokens
BIG_IMAGE = {"prompt": "a lighthouse", "size": "512x512", "num_inference_steps": 100, "n": 4}
TIMES: dict[str, float] = {}


def faults_config(timeout_s: float = 60.0, llm_seed: int = 0) -> dict:
    cfg = small_stages(base_config(), ("llm", "image"))
    cfg["app"]["request_timeout_s"] = timeout_s
    cfg["stages"]["llm"]["engine"]["seed"] = llm_seed
    return cfg


@pytest.fixture(scope="module")
def apps(serve_port):
    a, slow = App(APP, serve_port, faults_config()), App(SLOW_APP, serve_port, faults_config(timeout_s=2.0))
    a.deploy(wait=False)
    slow.deploy(wait=False)
    a.wait_healthy()
    slow.wait_healthy()
    yield a, slow
    for x in (a, slow):
        try:
            x.delete()
        except Exception:  # noqa: BLE001 - the shutdown test deletes omni-faults already
            pass
    if TIMES:
        print("\nfault recovery times: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def app(apps):
    return apps[0]


@pytest.fixture(scope="module")
def slow_app(apps):
    return apps[1]


@pytest.fixture(scope="module")
def client(app):
    with httpx.Client(base_url=app.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def slow_client(slow_app):
    with httpx.Client(base_url=slow_app.url, timeout=120) as c:
        yield c


def llm_idle(app: App):
    s = app.stats()["llm"]
    return s if s["num_running"] + s["num_waiting"] + s["num_streams"] == 0 and \
        s["num_free_blocks"] == s["num_blocks"] else None


def image_idle(app: App):
    s = app.stats()["image"]
    return s if s["active_requests"] + s["waiting_requests"] + s["num_streams"] == 0 else None


def first_data(lines) -> dict:
    for line in lines:
        if line.startswith("data: {"):
            return json.loads(line[6:])
    raise AssertionError("stream ended before any data")


def recover(client: httpx.Client, what: str, t0: float) -> float:
    """Poll with short requests until one succeeds; record the time since ``t0``."""
    def ok():
        r = client.post("/v1/completions", json=SHORT, timeout=60)
        return r.status_code == 200
    wait_until(ok, RECOVERY_S, f"service after {what}", interval=0.5)
    TIMES[what] = time.monotonic() - t0
    return TIMES[what]


# ----------------------------------------------------------------------------- disconnects
def test_disconnect_of_a_unary_request_aborts_it(app):
    before = app.stats()["llm"]["decode_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(app.url + "/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=1.5))
    s = wait_until(lambda: llm_idle(app), 60, "llm idle after the client went away")
    assert s["decode_tokens"] - before < 8 * 900, "the engine finished a request nobody waits for"


def test_disconnect_of_an_image_stream_aborts_it(app):
    aborted = app.stats()["image"]["requests_aborted"]
    body = {**BIG_IMAGE, "stream": True}
    with httpx.Client(base_url=app.url, timeout=60) as c, c.stream("POST", "/v1/pipelines/image", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while first_data(lines)["type"] != "progress":
            pass
    s = wait_until(lambda: image_idle(app), 60, "image stage idle after the client went away")
    assert s["requests_aborted"] == aborted + 1


# ----------------------------------------------------------------------------- killed actors
def test_kill_the_ar_replica_while_it_streams(app, client):
    (name,) = replica_ids(APP)["llm"]
    with client.stream("POST", "/v1/completions", json={**LONG1, "stream": True}) as r:
        lines = r.iter_lines()
        first_data(lines)
        t0 = time.monotonic()
        ray.kill(replica_actor(name), no_restart=True)
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    err = json.loads(rest[-2])
    assert err["status"] == 503 and err["error"]["type"] == "engine_error", rest[-3:]
    recover(client, "AR replica killed mid-stream", t0)
    (new,) = wait_until(lambda: replica_ids(APP).get("llm"), 60, "a new llm replica")
    assert new != name
    wait_until(lambda: llm_idle(app), 60, "the new llm replica idle")


def test_kill_the_image_replica_while_it_denoises(app, client):
    (name,) = replica_ids(APP)["image"]
    out: dict = {}

    def call():
        out["r"] = httpx.post(app.url + "/v1/images/generations", json=BIG_IMAGE, timeout=120)

    th = threading.Thread(target=call)
    th.start()
    wait_until(lambda: app.stats()["image"]["active_requests"] > 0, 60, "the image request running")
    t0 = time.monotonic()
    ray.kill(replica_actor(name), no_restart=True)
    th.join(120)
    assert out["r"].status_code == 503 and out["r"].json()["error"]["type"] == "engine_error", out["r"].text

    def image_ok():
        r = client.post("/v1/images/generations", json={"prompt": "x", "size": "32x32", "num_inference_steps": 1})
        return r.status_code == 200
    wait_until(image_ok, RECOVERY_S, "images after the image replica was killed", interval=0.5)
    TIMES["image replica killed mid-request"] = time.monotonic() - t0


@pytest.mark.parametrize("service", ["scheduler", "dit cache"])
def test_kill_a_cluster_service_actor(app, client, service):
    from omni_ray.cluster.admission.actor import scheduler_name
    from omni_ray.cluster.dit_cache import cache_name
    from omni_ray.cluster.named_actor import NAMESPACE

    name = scheduler_name(APP) if service == "scheduler" else cache_name(APP)
    t0 = time.monotonic()
    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)      # Ray restarts it
    recover(client, f"{service} actor killed", t0)
    img = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 1, "seed": 3}
    for _ in range(2):                       # the second one may come from the (new) cache
        r = client.post("/v1/images/generations", json=img)
        assert r.status_code == 200, r.text
    r = client.post("/v1/pipelines/text2image", json={"prompt": "a fox", "size": "32x32", "num_inference_steps": 1,
                                                      "max_tokens": 4})
    assert r.status_code == 200, r.text
    wait_until(lambda: llm_idle(app) and image_idle(app), 60, "engines idle")


# ----------------------------------------------------------------------------- redeploy
def scheduler_status(app_name: str) -> dict:
    from omni_ray.cluster.admission.actor import scheduler_name
    from omni_ray.cluster.named_actor import NAMESPACE

    return ray.get(ray.get_actor(scheduler_name(app_name), namespace=NAMESPACE).get_status.remote(), timeout=10)


def serve_details(app_name: str) -> dict | None:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()["applications"].get(app_name)


def replica_states(app_name: str) -> dict[str, dict[str, str]]:
    """{deployment: {replica id: state}} as the Serve controller reports them."""
    d = serve_details(app_name) or {}
    return {n: {r["replica_id"]: getattr(r["state"], "value", r["state"]) for r in dep["replicas"]}
            for n, dep in (d.get("deployments") or {}).items()}


class Watch(threading.Thread):
    """Polls ``what()`` (a name -> bool map) until stopped; records when each name first read true."""

    def __init__(self, what):
        super().__init__(daemon=True)
        self.what, self.first, self.stop = what, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            now = time.monotonic()
            for name, seen in self.what().items():
                if seen:
                    self.first.setdefault(name, now)
            time.sleep(0.05)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(10)


def test_redeploy_lets_in_flight_requests_finish(app, client):
    """A new version (llm engine seed changed) rolls out while a stream is running: the old llm and
    ingress replicas are told to stop (STOPPING) while the stream still runs through them, the
    stream completes on them within the grace period, then the new replicas serve."""
    old = replica_ids(APP)
    before = replica_states(APP)
    assert all(set(st.values()) == {"RUNNING"} for st in before.values()), before

    def old_stopping():
        now = replica_states(APP)
        return {d: any(now.get(d, {}).get(rid) == "STOPPING" for rid in before[d]) for d in ("llm", "Ingress")}

    with client.stream("POST", "/v1/completions", json={**LONG1, "stream": True}) as r, Watch(old_stopping) as w:
        lines = r.iter_lines()
        first = first_data(lines)
        t0 = time.monotonic()
        app.deploy(faults_config(llm_seed=1), wait=False)
        events = [first] + [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        t_last = time.monotonic()
    assert all("error" not in e for e in events), events[-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 1
    for d in ("llm", "Ingress"):
        assert d in w.first and w.first[d] < t_last, f"the old {d} replica did not begin stopping while the " \
                                                     f"stream was in flight: nothing tested the grace period"
    assert t_last - t0 < GRACE_S, "the stream outlived the grace period (it may have been cut short)"
    TIMES["in flight at redeploy, finished after"] = t_last - t0
    wait_until(lambda: (ids := replica_ids(APP)) and ids.get("llm") and ids.get("Ingress")
               and not (ids["llm"] & old["llm"]) and not (ids["Ingress"] & old["Ingress"])
               and len(ids["llm"]) == 1 and ids, RECOVERY_S, "the new version's replicas")
    admitted = scheduler_status(APP)["processed"]["admitted"]
    recover(client, "redeploy (rolling update)", t0)
    assert scheduler_status(APP)["processed"]["admitted"] > admitted, "the new ingress bypasses the app's scheduler"


# ----------------------------------------------------------------------------- timeouts (omni-timeouts: 2 s)
def test_unary_timeout_is_504_and_frees_the_engine(slow_app, slow_client):
    app, client = slow_app, slow_client
    before = app.stats()["llm"]["decode_tokens"]
    t0 = time.monotonic()
    r = client.post("/v1/completions", json=LONG)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
    assert time.monotonic() - t0 < 60
    s = wait_until(lambda: llm_idle(app), 60, "llm idle after the timeout")
    assert s["decode_tokens"] - before < 8 * 900


def test_stream_timeout_ends_the_stream_with_504(slow_app, slow_client):
    app, client = slow_app, slow_client
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900, "ignore_eos": True,
            "n": 8, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])
    assert err["status"] == 504 and err["error"]["type"] == "timeout_error"
    wait_until(lambda: llm_idle(app), 60, "llm idle after the stream timed out")


def test_image_timeout_is_504_and_frees_the_slot(slow_app, slow_client):
    app, client = slow_app, slow_client
    # warm-up, same prompt: its text conditioning is now in the DiT cache, so the big request below
    # reaches the engine well within the 2 s deadline (a cold text encoder on a busy CPU may not)
    small = {"prompt": BIG_IMAGE["prompt"], "size": "32x32", "num_inference_steps": 1}
    wait_until(lambda: client.post("/v1/images/generations", json=small).status_code == 200, 60,
               "a small image within the 2 s deadline", interval=0.5)
    counts = ("requests_added", "requests_aborted", "requests_finished")
    before = app.stats()["image"]
    r = client.post("/v1/images/generations", json=BIG_IMAGE)
    assert r.status_code == 504, r.text
    s = wait_until(lambda: image_idle(app), 60, "image stage idle after the timeout")
    added, aborted, finished = (s[k] - before[k] for k in counts)
    assert (added, aborted, finished) == (1, 1, 0), "the engine must get the request and abort it"


def test_pipeline_timeout_frees_every_stage(slow_app, slow_client):
    app, client = slow_app, slow_client
    r = client.post("/v1/pipelines/text2image", json={"prompt": "a fox", "max_tokens": 4, "size": "512x512",
                                                      "num_inference_steps": 100, "n": 4})
    assert r.status_code == 504, r.text
    wait_until(lambda: llm_idle(app) and image_idle(app), 60, "engines idle after the pipeline timed out")
    recover(client, "after a pipeline timeout", time.monotonic())


# ----------------------------------------------------------------------------- shutdown
def live_requests(app_name: str) -> int:
    """Requests the app's scheduler has admitted and not yet seen finish (a direct actor call)."""
    return scheduler_status(app_name)["live"]


def test_shutdown_lets_in_flight_requests_finish(app):
    """Serve stops the app with the config's grace period on every deployment (ingress included);
    a unary request and a stream in flight when the shutdown starts (the app DELETING) both
    complete, within that period."""
    from ray import serve

    deps = serve_details(APP)["deployments"]
    grace = {name: d["deployment_config"]["graceful_shutdown_timeout_s"] for name, d in deps.items()}
    assert grace == {"Ingress": GRACE_S, "llm": GRACE_S, "image": GRACE_S}
    out: dict = {}

    def unary():
        out["r"] = httpx.post(app.url + "/v1/completions", json=LONG, timeout=120)
        out["t"] = time.monotonic()

    def deleting():
        st = serve.status().applications.get(APP)
        return {"app": st is None or st.status == "DELETING"}

    th = threading.Thread(target=unary)
    th.start()
    with httpx.Client(base_url=app.url, timeout=120) as c, \
            c.stream("POST", "/v1/completions", json={**LONG1, "stream": True}) as r:
        lines = r.iter_lines()
        first = first_data(lines)                     # the engine is generating
        wait_until(lambda: live_requests(APP) >= 2, 30, "both requests admitted", interval=0.05)
        with Watch(deleting) as w:
            t_delete = time.monotonic()
            serve.delete(APP, _blocking=False)
            events = [first] + [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
            t_stream = time.monotonic()
            th.join(120)
    assert out["r"].status_code == 200, out["r"].text
    assert out["r"].json()["usage"]["completion_tokens"] == 8 * 900
    assert all("error" not in e for e in events), events[-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "app" in w.first, "the app never showed as DELETING"
    assert w.first["app"] < min(out["t"], t_stream), "a request was over before the shutdown began"
    assert max(out["t"], t_stream) - t_delete < GRACE_S
    TIMES["in flight at shutdown, finished after"] = max(out["t"], t_stream) - t_delete
    wait_until(lambda: APP not in serve.status().applications, 120, "the app gone")
