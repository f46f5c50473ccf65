"""What every stage replica shares: engine stats, Serve's health check, /health, metrics, shutdown,
and how a client error leaves a stage call.

A stage deployment sets ``self.stage``, ``self.engine`` (an async engine with ``stats``,
``check_health`` and ``shutdown``) and ``self.capacity`` (its CapacityReporter), then calls
``self.start_metrics(services, model)`` (``self.metrics``: omni_ray.metrics.StageMetrics).

Client errors (a 4xx OmniError: bad input found by the engine, e.g. a prompt over the token limit)
leave a stage call as a value, not as an exception: the last item of a stream
(``errors_as_values``), the result of a unary call (``error_as_value``). Serve logs every exception
a replica method raises as a failed request with its traceback and counts it in its error metrics;
a client error is not a failure (the replica's metrics log it on one line, status client_error).
The ingress (deployments/ingress/remote_stages.py) raises the value again. Failures (5xx) are
raised as before.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator, Awaitable, TypeVar

from omni_ray.config import MetricsConfig, validate
from omni_ray.errors import OmniError, is_client_error
from omni_ray.heap import freeze_startup_heap
from omni_ray.logs import install_request_id_filter
from omni_ray.metrics import StageMetrics

T = TypeVar("T")


class QuietProbes(logging.Filter):
    """Drops Serve's access-log line of each ``health`` call that succeeded: every ingress replica
    probes every stage every ``app.stage_health.probe_interval_s``
    (deployments/ingress/stage_health.py). A probe that fails is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(record, "serve_access_log", False) and record.getMessage().startswith("CALL health OK"))


def install_quiet_probes(logger_name: str = "ray.serve") -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, QuietProbes) for f in logger.filters):
        logger.addFilter(QuietProbes())


async def errors_as_values(items: AsyncIterator[T]) -> AsyncIterator[T | OmniError]:
    """``items``, ending with the client error that stopped them as the last item (failures raise).
    Closing this closes ``items`` (the engine stream: its request is aborted)."""
    try:
        async for item in items:
            yield item
    except OmniError as err:
        if not is_client_error(err):
            raise
        yield err
    finally:
        await items.aclose()


async def error_as_value(result: Awaitable[T]) -> T | OmniError:
    """``await result``, or the client error it raised (failures raise)."""
    try:
        return await result
    except OmniError as err:
        if not is_client_error(err):
            raise
        return err


class StageReplica:
    def start_metrics(self, services: dict | None, model: str) -> StageMetrics:
        """Per-request metrics and a thread sampling ``engine.stats()`` into gauges; request ids
        in this replica's log lines."""
        from deployments.services import replica_id

        cfg = validate(MetricsConfig, (services or {}).get("metrics") or {})
        install_request_id_filter("ray.serve")
        install_quiet_probes()
        self.metrics = StageMetrics(self.stage, model, replica_id(), cfg)
        self.metrics.start_sampling(self.engine.stats)
        freeze_startup_heap()                     # the replica is built: its engine's heap stays out of collections
        return self.metrics

    def stats(self) -> dict:
        return self.engine.stats()

    def check_health(self) -> None:      # Serve's periodic replica health check
        self.engine.check_health()
        self.capacity.refresh()

    def health(self) -> dict:             # the ingress's /health
        self.engine.check_health()
        return {"stage": self.stage, "status": "ok"}

    def __del__(self):
        """Serve's shutdown hook: Serve awaits the coroutine this returns. Once only: Python calls
        ``__del__`` again when it collects the replica, where an ``async def __del__`` would leave a
        coroutine that nobody awaits."""
        if getattr(self, "_shut_down", False):
            return None
        self._shut_down = True
        return self.shutdown()

    async def shutdown(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop()
        self.capacity.leave()
        await self.engine.shutdown()
