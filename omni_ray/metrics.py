"""Prometheus metrics of omni-ray, through Ray's metrics API (``ray.util.metrics``).

Every Ray node's metrics agent serves them at ``http://<node>:<metrics_export_port>/metrics``
(``ray.nodes()[i]["MetricsExportPort"]``; ``ray start --metrics-export-port``), each name prefixed
``ray_`` (``omni_time_to_first_token_seconds`` -> ``ray_omni_time_to_first_token_seconds``).
Every metric is labelled ``stage``, ``model`` and ``replica``; at the ingress ``stage`` is
``ingress`` and ``model`` the pipeline or endpoint (``chat``, ``text2image``, ...).

Engines stay Ray-free: the deployment layer records, per request (``StageMetrics.stream`` /
``track``; ``IngressMetrics``) and by sampling ``engine.stats()`` every ``app.metrics.interval_s``
on a small thread (``StageMetrics.start_sampling``). Recording costs a few microseconds and
never talks to Ray per call (the core worker batches and exports every few seconds); outside
Ray it is a no-op. ``SPECS`` is the single list of names: the Grafana dashboard
(``cluster_configs/grafana_dashboard.json``) is checked against it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from omni_ray.config import MetricsConfig
from omni_ray.errors import OmniError, is_client_error
from omni_ray.logs import bind_request_id, unbind_request_id

log = logging.getLogger("ray.serve")

TAGS = ("stage", "model", "replica")
EXPORT_PREFIX = "ray_"            # what Ray's exporter puts in front of every name
FLUSH_S = 1.0                     # longest a stage replica keeps inter-token latencies before recording them

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0]
E2E_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str                      # counter | gauge | histogram
    description: str
    extra_tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def tag_keys(self) -> tuple[str, ...]:
        return TAGS + self.extra_tags

    @property
    def exported(self) -> str:
        """The Prometheus series name (histograms add _bucket / _sum / _count)."""
        return EXPORT_PREFIX + self.name


SPECS = {s.name: s for s in [
    # ---- per request (recorded where requests are handled)
    Spec("omni_time_to_first_token_seconds", "histogram", "AR stage: request arrival to its first token",
         buckets=tuple(LATENCY_BUCKETS)),
    Spec("omni_inter_token_latency_seconds", "histogram",
         "AR stage: gap between output deltas divided by the tokens the later one carries", buckets=tuple(ITL_BUCKETS)),
    Spec("omni_e2e_latency_seconds", "histogram", "request latency: per stage request at a replica; "
         "the whole request at the ingress (stage=ingress, model=pipeline)", buckets=tuple(E2E_BUCKETS)),
    Spec("omni_requests_total", "counter", "finished requests by status (completed, failed, cancelled, "
         "client_error: a 4xx, the caller's fault)", extra_tags=("status",)),
    Spec("omni_generated_tokens_total", "counter", "AR stage: output tokens"),
    Spec("omni_errors_total", "counter", "failed requests (5xx, timeouts) by error kind (the OpenAI error type)",
         extra_tags=("kind",)),
    Spec("omni_client_errors_total", "counter", "requests refused as the client's error (4xx: bad input, "
         "unknown model, auth, a full queue) by kind (the OpenAI error type); not failures", extra_tags=("kind",)),
    Spec("omni_dit_cache_lookups_total", "counter", "DiT cache lookups by what (image, conditioning) and result",
         extra_tags=("kind", "result")),
    # ---- sampled from engine.stats() every interval_s
    Spec("omni_queue_depth", "gauge", "requests waiting in the engine (not yet scheduled)"),
    Spec("omni_running_requests", "gauge", "requests in the engine's running batch"),
    Spec("omni_kv_cache_usage", "gauge", "AR stage: fraction of KV cache blocks in use"),
    Spec("omni_prefix_cache_hit_rate", "gauge", "AR stage: prompt tokens found in the prefix cache / looked up"),
    Spec("omni_prefix_cache_hit_tokens_total", "counter", "AR stage: prompt tokens found in the prefix cache"),
    Spec("omni_prefix_cache_query_tokens_total", "counter", "AR stage: prompt tokens looked up in the prefix cache"),
    Spec("omni_dit_batch_size", "gauge", "DiT stage: images in the last denoising step's batch"),
    Spec("omni_dit_steps_total", "counter", "DiT stage: batched denoising steps (transformer forwards)"),
    Spec("omni_dit_step_images_total", "counter", "DiT stage: images over all steps (/ steps = mean batch size)"),
    Spec("omni_dit_step_cache_skip_rate", "gauge", "DiT stage: fraction of block evaluations skipped by step caching"),
    Spec("omni_dit_block_evals_total", "counter", "DiT stage: transformer block evaluations run"),
    Spec("omni_dit_block_evals_full_total", "counter", "DiT stage: block evaluations without step caching"),
    Spec("omni_dit_cache_hit_rate", "gauge", "DiT stage: DiT cache hits / lookups of this replica"),
    # ---- the app's scheduler actor (stage=<stage>, model=<app>, replica=<actor name>), every second
    Spec("omni_scheduler_queue_depth", "gauge", "requests waiting for the omni scheduler to admit them to a stage"),
]}

_made: dict[str, object] = {}
_made_lock = threading.Lock()


def metric(name: str):
    """The process's Ray metric object for ``SPECS[name]`` (created once; Ray keys them by name)."""
    m = _made.get(name)
    if m is not None:
        return m
    from ray.util import metrics as rm

    s = SPECS[name]
    with _made_lock:
        if name not in _made:
            if s.kind == "counter":
                _made[name] = rm.Counter(s.name, s.description, tag_keys=s.tag_keys)
            elif s.kind == "gauge":
                _made[name] = rm.Gauge(s.name, s.description, tag_keys=s.tag_keys)
            else:
                _made[name] = rm.Histogram(s.name, s.description, boundaries=list(s.buckets), tag_keys=s.tag_keys)
        return _made[name]


def error_kind(err: BaseException) -> str:
    """The ``kind`` label of an exception: the OpenAI error type of what the client sees."""
    if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    cause = getattr(err, "cause", None)                 # RayTaskError wraps the replica's exception
    if isinstance(cause, BaseException) and cause is not err:
        return error_kind(cause)
    if isinstance(err, OmniError):
        return err.error_type
    return "internal_error"


def unwrap(err: BaseException | None) -> BaseException | None:
    """The replica's exception that a RayTaskError wraps (``cause``), or ``err`` itself."""
    cause = getattr(err, "cause", None)
    return unwrap(cause) if isinstance(cause, BaseException) and cause is not err else err


def _status(err: BaseException | None) -> str:
    if err is None:
        return "completed"
    if error_kind(err) == "cancelled":
        return "cancelled"
    return "client_error" if is_client_error(unwrap(err)) else "failed"


def _error_counter(status: str) -> str | None:
    return {"failed": "omni_errors_total", "client_error": "omni_client_errors_total"}.get(status)


def outcome(err: BaseException | None) -> str:
    """How a request ended, for its one log line: ``completed``, ``cancelled``, or the status with
    the HTTP status, error type and message (``client_error 400 invalid_request_error: ...``)."""
    status = _status(err)
    if err is None or status == "cancelled":
        return status
    e = unwrap(err)
    if isinstance(e, OmniError):
        param = f" (param {e.param})" if e.param else ""
        return f"{status} {e.http_status} {e.error_type}: {e.message}{param}"
    return f"{status} ({error_kind(err)}): {type(e).__name__}: {e}"


class Recorder:
    """Record into SPECS with fixed stage/model/replica tags; a no-op when disabled."""

    def __init__(self, stage: str, model: str, replica: str, enabled: bool = True):
        self.tags = {"stage": str(stage), "model": str(model), "replica": str(replica)}
        self.enabled = enabled

    def observe(self, name: str, value: float, **extra: str) -> None:
        if self.enabled:
            metric(name).observe(value, tags=self.tags | extra if extra else self.tags)

    def inc(self, name: str, value: float = 1.0, **extra: str) -> None:
        if self.enabled and value > 0:
            metric(name).inc(value, tags=self.tags | extra if extra else self.tags)

    def set(self, name: str, value: float, **extra: str) -> None:
        if self.enabled:
            metric(name).set(float(value), tags=self.tags | extra if extra else self.tags)

    def finished(self, started: float, err: BaseException | None, count_error: bool = True) -> float:
        """e2e latency, requests by status, errors by kind; returns the latency."""
        elapsed = time.perf_counter() - started
        status = _status(err)
        self.observe("omni_e2e_latency_seconds", elapsed)
        self.inc("omni_requests_total", status=status)
        counter = _error_counter(status)
        if counter is not None and count_error:
            self.inc(counter, kind=error_kind(err))
        return elapsed


# ============================================================================ stage replicas
class StageMetrics(Recorder):
    """A stage replica's metrics: per request (``stream`` for AR deltas, ``track`` for anything
    else), DiT cache lookups, and gauges sampled from ``engine.stats()``."""

    def __init__(self, stage: str, model: str, replica: str, config: MetricsConfig | None = None):
        self.config = config or MetricsConfig()
        super().__init__(stage, model, replica, self.config.enabled)
        self._last: dict[str, float] = {}
        self._lookups = {"hit": 0, "miss": 0}
        self._itl: list[float] = []          # inter-token latencies not yet recorded (``flush``)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ per request
    async def stream(self, deltas: AsyncIterator[dict], request_id: str) -> AsyncIterator[dict]:
        """Pass AR deltas through, recording TTFT, inter-token latency (per delta), tokens, e2e
        and errors; one log line when the request ends. Inter-token latencies are kept in a list and
        recorded by the sampling thread (``flush``; at the request's end when none runs): a Ray
        metric call costs tens of microseconds on the event loop that streams, once per delta."""
        bind_request_id(request_id)
        t0 = last = time.perf_counter()
        ttft, tokens, reason, err = None, 0, None, None
        try:
            async for d in deltas:
                n = len(d["token_ids"])
                if n:
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                        self.observe("omni_time_to_first_token_seconds", ttft)
                    elif self.enabled:
                        self._itl.append((now - last) / n)
                    last = now
                    tokens += n
                reason = d.get("finish_reason") or reason
                yield d
        except BaseException as e:
            err = e
            raise
        finally:
            self.inc("omni_generated_tokens_total", tokens)
            if self._thread is None:
                self.flush()
            self._done(request_id, t0, err, f"{tokens} tokens, ttft {_fmt(ttft)}, finish {reason}")

    def flush(self) -> None:
        """Record the inter-token latencies kept since the last flush."""
        pending, self._itl = self._itl, []
        for v in pending:
            self.observe("omni_inter_token_latency_seconds", v)

    @contextmanager
    def track(self, request_id: str, what: str = "request"):
        """Time a whole stage call (encode, a DiT generation): e2e, status, errors, a log line."""
        token = bind_request_id(request_id)
        t0, err = time.perf_counter(), None
        try:
            yield
        except BaseException as e:
            err = e
            raise
        finally:
            self._done(request_id, t0, err, what)
            unbind_request_id(token)

    def _done(self, request_id: str, t0: float, err: BaseException | None, detail: str) -> None:
        """Metrics and one log line: INFO, or WARNING for a failure (a client error is not one)."""
        elapsed = self.finished(t0, err)
        if self.config.log_requests or _status(err) == "failed":
            log.log(logging.WARNING if _status(err) == "failed" else logging.INFO,
                    "%s request %s %s in %.3f s: %s", self.tags["stage"], request_id, outcome(err), elapsed, detail,
                    extra={"omni_request_id": request_id})

    def cache_lookup(self, kind: str, hit: bool) -> None:
        result = "hit" if hit else "miss"
        self._lookups[result] += 1
        self.inc("omni_dit_cache_lookups_total", kind=kind, result=result)
        self.set("omni_dit_cache_hit_rate", self._lookups["hit"] / (self._lookups["hit"] + self._lookups["miss"]))

    # ------------------------------------------------------------------ sampled gauges
    def record_stats(self, s: dict) -> None:
        """Gauges and counters from one ``engine.stats()`` (AR or DiT; keys that are absent are skipped)."""
        if "kv_cache_usage" in s:                                      # AR engine
            self.set("omni_queue_depth", s["num_waiting"])
            self.set("omni_running_requests", s["num_running"])
            self.set("omni_kv_cache_usage", s["kv_cache_usage"])
            self.set("omni_prefix_cache_hit_rate", s["prefix_cache_hit_rate"])
            self._delta("omni_prefix_cache_hit_tokens_total", s["prefix_cache_hit_tokens"])
            self._delta("omni_prefix_cache_query_tokens_total", s["prefix_cache_query_tokens"])
        if "block_evals" in s:                                         # DiT engine
            self.set("omni_queue_depth", s["waiting_requests"])
            self.set("omni_running_requests", s["active_requests"])
            self.set("omni_dit_batch_size", s["last_batch_size"])
            self._delta("omni_dit_steps_total", s["steps"])
            self._delta("omni_dit_step_images_total", round(s["avg_batch_size"] * s["steps"]))
            full = s["block_evals_without_cache"]
            self.set("omni_dit_step_cache_skip_rate", 1.0 - s["block_evals"] / full if full else 0.0)
            self._delta("omni_dit_block_evals_total", s["block_evals"])
            self._delta("omni_dit_block_evals_full_total", full)

    def _delta(self, name: str, total: float) -> None:
        """Counters from the engine's running totals: add what is new since the last sample."""
        self.inc(name, total - self._last.get(name, 0))
        self._last[name] = max(total, self._last.get(name, 0))

    def start_sampling(self, stats: Callable[[], dict]) -> None:
        """Sample ``stats()`` every ``interval_s`` on a daemon thread until ``stop()``; it also
        records the kept inter-token latencies, at least every ``FLUSH_S``."""
        if not self.enabled or self._thread is not None:
            return

        def run():
            due = 0.0
            while True:
                if time.monotonic() >= due:
                    due = time.monotonic() + self.config.interval_s
                    try:
                        self.record_stats(stats())
                    except Exception as err:  # noqa: BLE001 - metrics never take the replica down
                        log.debug("metrics sampling failed: %r", err)
                stopped = self._stop.wait(min(FLUSH_S, max(0.0, due - time.monotonic())))
                self.flush()                 # the inter-token latencies kept meanwhile
                if stopped:
                    return

        self._thread = threading.Thread(target=run, name=f"omni-metrics-{self.tags['stage']}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


# ============================================================================ ingress
class IngressMetrics(Recorder):
    """The ingress's request latency and errors (stage=ingress, model=pipeline or endpoint).

    Admitted requests are recorded when their ticket is released (``finished``); errors that
    reach an HTTP error response without having been recorded (bad input, auth, 429 before
    admission) by ``http_error``. An exception is counted once (``_omni_metered``)."""

    def __init__(self, app: str, replica: str, config: MetricsConfig | None = None):
        self.config = config or MetricsConfig()
        super().__init__("ingress", app, replica, self.config.enabled)

    def for_pipeline(self, pipeline: str) -> Recorder:
        return Recorder("ingress", pipeline, self.tags["replica"], self.enabled)

    def request_finished(self, request_id: str, pipeline: str, started: float, err: BaseException | None) -> None:
        elapsed = self.for_pipeline(pipeline).finished(started, err, count_error=not _marked(err))
        _mark(err)
        if self.config.log_requests or _status(err) == "failed":
            log.log(logging.WARNING if _status(err) == "failed" else logging.INFO,
                    "ingress request %s (%s) %s in %.3f s", request_id, pipeline, outcome(err), elapsed,
                    extra={"omni_request_id": request_id})

    def rejected(self, pipeline: str, err: BaseException) -> None:
        """A request that failed before it was admitted (e.g. 429): errors only."""
        self._count_error(self.for_pipeline(pipeline), err)

    def http_error(self, err: BaseException) -> None:
        self._count_error(self, err)

    @staticmethod
    def _count_error(rec: Recorder, err: BaseException) -> None:
        """Once per exception: in omni_client_errors_total (4xx) or omni_errors_total (the rest)."""
        if not _marked(err):
            rec.inc(_error_counter(_status(err)) or "omni_errors_total", kind=error_kind(err))
            _mark(err)


def _mark(err: BaseException | None) -> None:
    """Note that ``err`` (and the replica exception a RayTaskError wraps) has been counted."""
    for e in (err, getattr(err, "cause", None)):
        if isinstance(e, BaseException):
            try:
                e._omni_metered = True
            except AttributeError:
                pass


def _marked(err: BaseException | None) -> bool:
    """Counted already: ``err``, what it wraps, or what it was raised from (the ingress re-raises
    other exceptions as their OmniError inside ``except``, which sets ``__context__``)."""
    related = (err, getattr(err, "cause", None), getattr(err, "__context__", None))
    return any(getattr(e, "_omni_metered", False) for e in related if isinstance(e, BaseException))


class SchedulerMetrics:
    """The scheduler actor's queue per stage (it samples itself once a second)."""

    def __init__(self, app: str, actor_name: str):
        self.app, self.actor = app, actor_name

    def record(self, queue_depth: dict[str, int]) -> None:
        for stage, n in queue_depth.items():
            Recorder(stage, self.app, self.actor).set("omni_scheduler_queue_depth", n)


_ingress: IngressMetrics | None = None


def install_ingress(m: IngressMetrics) -> None:
    """Make ``m`` the process's ingress recorder, for the HTTP error handlers (one ingress replica
    per process)."""
    global _ingress
    _ingress = m


def record_http_error(err: BaseException) -> None:
    """Count an error the HTTP layer answers with, unless already counted; no-op outside an ingress."""
    if _ingress is not None:
        _ingress.http_error(err)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"
