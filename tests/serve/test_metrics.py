"""Prometheus metrics and request ids in logs, on the running app (``serve run serve_config.yaml``).

A few requests of every kind go through the app; then the node's metrics endpoint (Ray's
metrics agent, ``ray.nodes()[0]["MetricsExportPort"]``) is scraped until every metric of
``omni_ray.metrics.SPECS`` is there with its labels, and the Serve log files are searched for one
request's id at the ingress and at its stage. A 400 raised inside the AR replica (a prompt over
``max_prompt_tokens``, found by its tokenizer) is one log line there and a client error, not a
failure, in the metrics.
"""

from __future__ import annotations

import glob
import os
import re
import time
import uuid

import httpx
import pytest

from omni_ray.metrics import SPECS

pytestmark = pytest.mark.ray

WAIT_S = 120          # give-up time for Ray's exporter (it pushes every few seconds); not a speed check
IMAGE = {"size": "64x64", "num_inference_steps": 3}
TOO_LONG = "lighthouse " * 9000            # over max_prompt_tokens (8192) once tokenized, under max_body_bytes
LONG_PROMPT = " ".join(["the lighthouse keeper watched the grey sea roll in under the evening sky"] * 6)

SERIES = re.compile(r"^(\w+?)(?:_bucket|_sum|_count)?\{(.*)\}\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[str, list[dict]]:
    """Prometheus text -> {metric name (histograms without suffix): [labels of each series]}."""
    out: dict[str, list[dict]] = {}
    for line in text.splitlines():
        m = SERIES.match(line)
        if m:
            labels = dict(LABEL.findall(m.group(2))) | {"__value__": m.group(3)}
            out.setdefault(m.group(1), []).append(labels)
    return out


def metrics_url() -> str:
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape_until(url: str, done) -> dict[str, list[dict]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            got = parse(httpx.get(url, timeout=10).text)
        except httpx.HTTPError:
            got = {}
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def replica_ids(app: str, deployment: str) -> set[str]:
    """The ids of ``app``'s ``deployment`` replicas (the ``replica`` label of their metrics)."""
    from ray.serve.context import _get_global_client

    deps = _get_global_client().get_serve_details()["applications"][app]["deployments"]
    return {r["replica_id"] for r in deps[deployment]["replicas"]}


def series(got: dict, spec_name: str, **labels) -> list[dict]:
    return [s for s in got.get(SPECS[spec_name].exported, []) if all(s.get(k) == v for k, v in labels.items())]


BAD_ID = f"metrics-400-{uuid.uuid4().hex[:8]}"     # this module's 400 (other modules' apps log 400s too)


@pytest.fixture(scope="module")
def traffic(client):
    """Requests that touch every metric; returns the id of one chat completion."""
    chat = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 12,
            "seed": 1}
    first = client.post("/v1/chat/completions", json=chat)
    assert first.status_code == 200, first.text
    assert client.post("/v1/chat/completions", json=chat).status_code == 200      # prefix-cache hit
    with client.stream("POST", "/v1/chat/completions", json=chat | {"stream": True}) as r:
        assert r.status_code == 200
        r.read()
    img = {"prompt": f"a red boat {uuid.uuid4().hex[:8]}", "seed": 3, "size": "64x64", "num_inference_steps": 8,
           "cache": {"method": "teacache", "threshold": 1.0}}
    for _ in range(2):                                                             # image-cache miss, then hit
        assert client.post("/v1/images/generations", json=img).status_code == 200
    r = client.post("/v1/pipelines/text2image", json={"prompt": "a fox", "max_tokens": 4, **IMAGE})
    assert r.status_code == 200, r.text
    assert client.post("/v1/chat/completions", json=chat | {"model": "no-such-model"}).status_code == 404
    r = client.post("/v1/completions", json={"model": "tiny-qwen3", "prompt": TOO_LONG, "max_tokens": 4},
                    headers={"X-Request-Id": BAD_ID})
    assert r.status_code == 400 and "the limit is 8192" in r.text, r.text       # found by the stage
    return first.json()["id"]


def test_metrics_endpoint_has_every_metric_with_labels(traffic):
    url = metrics_url()
    # no request of this traffic fails (5xx): omni_errors_total is never created (tests/test_metrics.py)
    names = [s.exported for s in SPECS.values() if s.name != "omni_errors_total"]

    def complete(got):
        return (all(n in got for n in names) and series(got, "omni_dit_cache_lookups_total", result="hit")
                and series(got, "omni_client_errors_total", stage="ingress", kind="not_found_error")
                and series(got, "omni_client_errors_total", stage="llm", kind="invalid_request_error")
                and any(float(s["__value__"]) > 0 for s in series(got, "omni_dit_step_cache_skip_rate"))
                # a sampled counter (every metrics.interval_s): wait for the sample after the repeat
                and any(float(s["__value__"]) > 0
                        for s in series(got, "omni_prefix_cache_hit_tokens_total", stage="llm")))

    got = scrape_until(url, complete)
    missing = [n for n in names if n not in got]
    assert not missing, f"not exported after {WAIT_S}s: {missing}"
    for spec in SPECS.values():
        for s in got.get(spec.exported, []):
            assert set(spec.tag_keys) <= set(s), f"{spec.exported} lacks labels: {s}"
    # labelled by the stage that records them, with its served model name
    for name in ("omni_time_to_first_token_seconds", "omni_inter_token_latency_seconds", "omni_kv_cache_usage",
                 "omni_prefix_cache_hit_rate", "omni_generated_tokens_total"):
        assert series(got, name, stage="llm", model="tiny-qwen3"), name
    for name in ("omni_dit_batch_size", "omni_dit_steps_total", "omni_dit_step_cache_skip_rate"):
        assert series(got, name, stage="image", model="tiny-pixart"), name
    assert series(got, "omni_e2e_latency_seconds", stage="ingress", model="chat")
    assert series(got, "omni_e2e_latency_seconds", stage="image", model="tiny-pixart")
    assert series(got, "omni_requests_total", stage="llm", status="completed")
    assert series(got, "omni_client_errors_total", stage="ingress", kind="not_found_error")
    # the 400 raised in the AR replica: a client error there, not a failure
    assert series(got, "omni_client_errors_total", stage="llm", kind="invalid_request_error")
    assert series(got, "omni_requests_total", stage="llm", status="client_error")
    # (the session's Ray cluster exports the series of every app it ran: the reliability apps' killed
    # replicas failed requests on purpose; the replica label tells this app's own llm replicas)
    failed = [s for s in series(got, "omni_requests_total", stage="llm", status="failed")
              if s["replica"] in replica_ids("omni", "llm")]
    assert not failed, failed
    assert not series(got, "omni_errors_total", kind="invalid_request_error")
    # values that the traffic must have made positive
    hits = series(got, "omni_prefix_cache_hit_tokens_total", stage="llm")
    assert sum(float(s["__value__"]) for s in hits) > 0
    skipped = series(got, "omni_dit_step_cache_skip_rate", stage="image")
    assert max(float(s["__value__"]) for s in skipped) > 0


def test_request_id_in_logs_of_ingress_and_stage(traffic):
    import ray

    logs_dir = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    rid = traffic

    def files_with_id() -> set[str]:
        found = set()
        for path in glob.glob(os.path.join(logs_dir, "replica_omni_*.log")):
            with open(path, errors="replace") as f:
                if rid in f.read():
                    found.add(os.path.basename(path))
        return found

    deadline = time.monotonic() + 30
    while not ({"Ingress", "llm"} <= {f.split("_")[2] for f in files_with_id()}) and time.monotonic() < deadline:
        time.sleep(0.25)
    found = files_with_id()
    assert any(f.startswith("replica_omni_Ingress_") for f in found), (rid, found)
    assert any(f.startswith("replica_omni_llm_") for f in found), (rid, found)


def test_a_400_inside_the_stage_is_one_log_line_not_a_traceback(traffic):
    """Serve logs an exception raised by a replica method as a failed request with its traceback; a
    client error leaves the replica as a value instead, and the replica logs it on one INFO line."""
    import ray

    logs_dir = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    def lines(deployment: str = "llm") -> list[str]:
        out = []
        for path in glob.glob(os.path.join(logs_dir, f"replica_omni_{deployment}_*.log")):
            with open(path, errors="replace") as f:
                out += f.read().splitlines()
        return out

    deadline = time.monotonic() + 30
    def ours(x: str) -> bool:
        return "client_error 400 invalid_request_error" in x and BAD_ID in x

    while not any(ours(line) for line in lines()) and time.monotonic() < deadline:
        time.sleep(0.25)
    text = lines()
    (line,) = [x for x in text if ours(x)]
    assert line.startswith("INFO") and "the limit is 8192 (param prompt)" in line, line
    rid = re.search(r"request (\S+) client_error", line).group(1)
    assert sum(rid in x for x in text) == 1, [x for x in text if rid in x]
    assert not any("InvalidRequestError" in x or "Request failed" in x for x in text), \
        "a client error was logged as a failed request"
    ingress = [x for x in lines("Ingress") if rid.rsplit("-", 1)[0] in x]       # the request's own id
    assert len([x for x in ingress if ours(x)]) == 1, ingress
    assert not any(x.startswith(("ERROR", "WARNING")) for x in ingress), ingress
    assert not any("InvalidRequestError" in x for x in ingress)      # (other modules' handle calls may log theirs)


def test_the_scheduler_counts_the_400_as_a_client_error(traffic):
    import ray

    from omni_ray.cluster.admission.actor import scheduler_name
    from omni_ray.cluster.named_actor import NAMESPACE

    actor = ray.get_actor(scheduler_name("omni"), namespace=NAMESPACE)
    deadline = time.monotonic() + 30
    while (st := ray.get(actor.get_status.remote(), timeout=30))["processed"]["client_error"] < 1 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert st["processed"]["client_error"] >= 1, st["processed"]
