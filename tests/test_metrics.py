"""omni_ray.metrics without Ray: what each recorder records (Ray's metric objects replaced by
fakes), engine stats -> gauges/counters on real tiny engines, request ids in log lines, and the
Grafana dashboard charting exactly the metrics the module defines. The scrape of a running app
is tests/serve/test_metrics.py."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import pytest

from omni_ray import metrics as m
from omni_ray.config import MetricsConfig
from omni_ray.errors import EngineError, InvalidRequestError, QueueFullError, RequestTimeoutError
from omni_ray.logs import RequestIdFilter, bind_request_id

ROOT = Path(__file__).resolve().parents[1]


class FakeMetric:
    def __init__(self, name):
        self.name, self.calls = name, []

    def observe(self, value, tags):
        self.calls.append(("observe", value, dict(tags)))

    def inc(self, value, tags):
        self.calls.append(("inc", value, dict(tags)))

    def set(self, value, tags):
        self.calls.append(("set", value, dict(tags)))


@pytest.fixture
def fake(monkeypatch):
    made: dict[str, FakeMetric] = {}

    def metric(name):
        assert name in m.SPECS, name
        return made.setdefault(name, FakeMetric(name))

    monkeypatch.setattr(m, "metric", metric)
    return made


def values(fake, name, **tags) -> list[float]:
    return [v for _, v, t in fake[name].calls if all(t.get(k) == x for k, x in tags.items())] if name in fake else []


def total(fake, name, **tags) -> float:
    return sum(values(fake, name, **tags))


def test_specs_are_valid_prometheus_names():
    for s in m.SPECS.values():
        assert re.fullmatch(r"omni_[a-z0-9_]+", s.name)
        assert s.kind in ("counter", "gauge", "histogram")
        assert s.tag_keys[:3] == ("stage", "model", "replica")
        assert (s.kind == "histogram") == bool(s.buckets)
        assert list(s.buckets) == sorted(s.buckets)
        assert s.name.endswith("_total") == (s.kind == "counter")


async def _deltas(chunks, fail=None):
    for c in chunks:
        await asyncio.sleep(0.001)
        yield {"token_ids": list(range(c)), "finish_reason": None, "text": "x"}
    if fail is not None:
        raise fail


def test_stream_records_ttft_itl_tokens_and_e2e(fake):
    sm = m.StageMetrics("llm", "tiny-qwen3", "r1", MetricsConfig(log_requests=False))

    async def run():
        return [d async for d in sm.stream(_deltas([1, 0, 4, 2]), "req-1")]

    out = asyncio.run(run())
    assert len(out) == 4
    tags = {"stage": "llm", "model": "tiny-qwen3", "replica": "r1"}
    assert len(values(fake, "omni_time_to_first_token_seconds", **tags)) == 1
    assert len(values(fake, "omni_inter_token_latency_seconds")) == 2         # deltas with tokens after the first
    assert all(v > 0 for v in values(fake, "omni_inter_token_latency_seconds"))
    assert total(fake, "omni_generated_tokens_total", **tags) == 7
    assert len(values(fake, "omni_e2e_latency_seconds", **tags)) == 1
    assert total(fake, "omni_requests_total", status="completed") == 1
    assert "omni_errors_total" not in fake


def test_stream_counts_errors_by_kind_and_cancellations(fake):
    sm = m.StageMetrics("llm", "m", "r1", MetricsConfig(log_requests=False))

    async def run(it):
        return [d async for d in sm.stream(it, "req-2")]

    with pytest.raises(EngineError):
        asyncio.run(run(_deltas([], fail=EngineError("engine step failed"))))
    assert total(fake, "omni_errors_total", kind="engine_error") == 1
    assert total(fake, "omni_requests_total", status="failed") == 1
    with pytest.raises(InvalidRequestError):                   # the client's error: counted apart
        asyncio.run(run(_deltas([], fail=InvalidRequestError("bad"))))
    assert total(fake, "omni_client_errors_total", kind="invalid_request_error") == 1
    assert total(fake, "omni_requests_total", status="client_error") == 1
    assert total(fake, "omni_requests_total", status="failed") == 1 and total(fake, "omni_errors_total") == 1

    async def cancelled():
        task = asyncio.ensure_future(run(_deltas([1] * 1000)))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(cancelled())
    assert total(fake, "omni_requests_total", status="cancelled") == 1
    assert total(fake, "omni_errors_total") == 1                               # cancellation is not an error


def test_track_and_cache_lookups(fake):
    sm = m.StageMetrics("image", "tiny-pixart", "r2", MetricsConfig(log_requests=False))
    with sm.track("req-3"):
        pass
    with pytest.raises(RequestTimeoutError):
        with sm.track("req-4"):
            raise RequestTimeoutError("slow")
    assert total(fake, "omni_requests_total", status="completed") == 1
    assert total(fake, "omni_errors_total", kind="timeout_error") == 1
    for hit in (False, True, True):
        sm.cache_lookup("image", hit)
    assert total(fake, "omni_dit_cache_lookups_total", kind="image", result="hit") == 2
    assert values(fake, "omni_dit_cache_hit_rate")[-1] == pytest.approx(2 / 3)


def test_disabled_records_nothing(fake):
    sm = m.StageMetrics("llm", "m", "r", MetricsConfig(enabled=False, log_requests=False))
    with sm.track("x"):
        pass
    sm.record_stats({"kv_cache_usage": 0.5, "num_waiting": 1, "num_running": 2, "prefix_cache_hit_rate": 0.0,
                     "prefix_cache_hit_tokens": 3, "prefix_cache_query_tokens": 4})
    sm.start_sampling(dict)
    assert fake == {} and sm._thread is None


def test_ingress_counts_each_error_once(fake):
    im = m.IngressMetrics("omni", "r0", MetricsConfig(log_requests=False))
    m.install_ingress(im)
    try:
        err = InvalidRequestError("bad max_tokens")
        im.request_finished("chatcmpl-1", "chat", 0.0, err)            # the ticket is released first
        m.record_http_error(err)                                       # then the HTTP handler answers
        assert total(fake, "omni_client_errors_total", stage="ingress", model="chat",
                     kind="invalid_request_error") == 1
        assert total(fake, "omni_client_errors_total") == 1 and total(fake, "omni_errors_total") == 0
        assert total(fake, "omni_requests_total", model="chat", status="client_error") == 1
        m.record_http_error(InvalidRequestError("no such model"))      # rejected before admission
        im.rejected("chat", QueueFullError("full"))
        assert total(fake, "omni_client_errors_total", model="omni", kind="invalid_request_error") == 1
        assert total(fake, "omni_client_errors_total", model="chat", kind="rate_limit_error") == 1
        m.record_http_error(EngineError("a stage replica is unavailable"))   # a failure
        assert total(fake, "omni_errors_total", model="omni", kind="engine_error") == 1
        assert total(fake, "omni_errors_total") == 1
        im.request_finished("chatcmpl-2", "chat", 0.0, None)
        assert total(fake, "omni_requests_total", model="chat", status="completed") == 1
    finally:
        m.install_ingress(None)


def test_error_kind_unwraps_ray_task_errors():
    class Wrapped(Exception):
        def __init__(self, cause):
            self.cause = cause

    assert m.error_kind(Wrapped(QueueFullError("x"))) == "rate_limit_error"
    assert m.error_kind(asyncio.CancelledError()) == "cancelled"
    assert m.error_kind(ValueError("x")) == "internal_error"


# ----------------------------------------------------------------------------- engine stats contract
def test_ar_engine_stats_feed_kv_prefix_and_queue_metrics(fake):
    from omni_ray.ar import LLM, SamplingParams

    llm = LLM("tiny:qwen3", enforce_eager=True, num_kvcache_blocks=64, kvcache_block_size=16, max_model_len=512)
    prompt = " ".join(["a lighthouse on a rocky shore at dusk"] * 8)
    sm = m.StageMetrics("llm", "tiny-qwen3", "r", MetricsConfig())
    for _ in range(2):                          # the second prompt finds the first's blocks
        llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
        sm.record_stats(llm.engine_stats())
    assert total(fake, "omni_prefix_cache_hit_tokens_total") > 0
    assert total(fake, "omni_prefix_cache_query_tokens_total") >= total(fake, "omni_prefix_cache_hit_tokens_total")
    assert 0 < values(fake, "omni_prefix_cache_hit_rate")[-1] <= 1
    assert values(fake, "omni_queue_depth") == [0, 0] and values(fake, "omni_running_requests") == [0, 0]
    assert 0 <= values(fake, "omni_kv_cache_usage")[-1] <= 1
    sm.record_stats(llm.engine_stats())         # nothing new: the counters do not move
    assert len(fake["omni_prefix_cache_hit_tokens_total"].calls) == 1


def test_dit_engine_stats_feed_batch_and_skip_metrics(fake):
    from omni_ray.dit import DiffusionParams, DiTEngine

    engine = DiTEngine("tiny:pixart", device="cpu")
    sm = m.StageMetrics("image", "tiny-pixart", "r", MetricsConfig())
    params = DiffusionParams(height=64, width=64, num_inference_steps=8, seed=0,
                             cache={"method": "teacache", "threshold": 1.0})
    engine.generate(["a red fox", "a blue boat"], params)
    s = engine.engine_stats()
    sm.record_stats(s)
    assert total(fake, "omni_dit_steps_total") == s["steps"] > 0
    assert total(fake, "omni_dit_step_images_total") / total(fake, "omni_dit_steps_total") == pytest.approx(
        s["avg_batch_size"])
    assert total(fake, "omni_dit_block_evals_total") < total(fake, "omni_dit_block_evals_full_total")
    assert 0 < values(fake, "omni_dit_step_cache_skip_rate")[-1] < 1
    assert values(fake, "omni_dit_batch_size")[-1] == s["last_batch_size"]


def test_sampling_thread_records_until_stopped(fake):
    sm = m.StageMetrics("llm", "m", "r", MetricsConfig(interval_s=0.01))
    calls = defaultdict(int)

    def stats():
        calls["n"] += 1
        return {"kv_cache_usage": 0.25, "num_waiting": 3, "num_running": 1, "prefix_cache_hit_rate": 0.0,
                "prefix_cache_hit_tokens": 0, "prefix_cache_query_tokens": 0}

    sm.start_sampling(stats)
    try:
        for _ in range(500):
            if calls["n"] >= 3:
                break
            sm._stop.wait(0.01)
    finally:
        sm.stop()
        sm._thread.join(5)
    assert calls["n"] >= 3 and not sm._thread.is_alive()
    assert values(fake, "omni_queue_depth")[-1] == 3


# ----------------------------------------------------------------------------- logs
def test_log_lines_carry_the_bound_request_id():
    logger = logging.getLogger("omni-test-logs")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addFilter(RequestIdFilter())
    seen = []

    class H(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger.addHandler(H())

    async def request(rid):
        bind_request_id(rid)
        await asyncio.sleep(0)
        logger.info("working on %s", "it")

    async def main():
        await asyncio.gather(request("chatcmpl-a"), request("pipe-b"))

    asyncio.run(main())
    logger.info("outside")
    assert sorted(seen[:2]) == ["[chatcmpl-a] working on it", "[pipe-b] working on it"]
    assert seen[2] == "outside"


# ----------------------------------------------------------------------------- dashboard
def test_grafana_dashboard_charts_exactly_the_defined_metrics():
    dash = json.loads((ROOT / "cluster_configs" / "grafana_dashboard.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels and all(p["targets"] and p["title"] for p in panels)
    exported = {s.exported for s in m.SPECS.values()}
    used = set()
    for p in panels:
        for t in p["targets"]:
            expr = t["expr"]
            assert expr.count("(") == expr.count(")"), expr
            for name in re.findall(r"\bray_omni_\w+", expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert base in exported, f"panel {p['title']!r} uses unknown metric {name}"
                if name.endswith("_bucket"):
                    assert m.SPECS[base[len(m.EXPORT_PREFIX):]].kind == "histogram", name
                used.add(base)
    assert used == exported, f"metrics without a panel: {sorted(exported - used)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "stage", "model", "replica"}


def test_ingress_does_not_count_a_re_raised_error_twice(fake):
    """The ingress releases the ticket with the original exception, then raises its OmniError."""
    im = m.IngressMetrics("omni", "r0", MetricsConfig(log_requests=False))
    m.install_ingress(im)
    try:
        class Wrapped(Exception):
            def __init__(self, cause):
                self.cause = cause

        inner = QueueFullError("stage busy")
        wrapper = Wrapped(inner)
        im.request_finished("pipe-1", "text2image", 0.0, wrapper)
        m.record_http_error(inner)                          # typed(wrapper) is the replica's exception
        try:
            try:
                raise ValueError("boom")
            except ValueError as e:
                im.request_finished("pipe-2", "text2image", 0.0, e)
                raise InvalidRequestError("internal") from None    # a new OmniError raised in `except`
        except InvalidRequestError as converted:
            m.record_http_error(converted)
        assert total(fake, "omni_client_errors_total", kind="rate_limit_error") == 1
        assert total(fake, "omni_errors_total", kind="internal_error") == 1
        assert total(fake, "omni_errors_total") == 1 and total(fake, "omni_client_errors_total") == 1
    finally:
        m.install_ingress(None)


def test_a_client_error_is_one_info_line_and_a_failure_a_warning(fake, caplog):
    """A 4xx raised in a stage request: one INFO line with the request id, the status, the error
    type and message, no traceback; an engine failure: one WARNING line."""
    sm = m.StageMetrics("llm", "m", "r1", MetricsConfig(log_requests=True))

    async def run(it, rid):
        return [d async for d in sm.stream(it, rid)]

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        with pytest.raises(InvalidRequestError):
            asyncio.run(run(_deltas([], fail=InvalidRequestError("prompt is too long", param="prompt")), "req-7"))
        with pytest.raises(EngineError):
            asyncio.run(run(_deltas([2], fail=EngineError("step failed")), "req-8"))
    lines = [r for r in caplog.records if r.name == "ray.serve"]
    assert [(r.levelno, r.exc_info) for r in lines] == [(logging.INFO, None), (logging.WARNING, None)]
    first, second = lines[0].getMessage(), lines[1].getMessage()
    assert "req-7" in first and "client_error 400 invalid_request_error: prompt is too long (param prompt)" in first
    assert "\n" not in first
    assert "req-8" in second and "failed 503 engine_error: step failed" in second
