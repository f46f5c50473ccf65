"""Admission of ingress requests through the omni scheduler (``scheduler.enabled``).

    ticket = await admission.admit(request_id, "text2image", ["llm", "image"], "normal")
                                     # waits for a slot on the first stage; QueueFullError -> 429
    async with ticket.stage("llm"): ...            # gate (later stages), start / finish reports
    ticket.cancelled                               # asyncio.Event: cancelled through the scheduler
    await ticket.release(error)                    # completed / failed / cancelled / client_error (4xx); idempotent

With the scheduler disabled every request is admitted at once and nothing is reported.
"""

from __future__ import annotations

import asyncio
import functools
import time
from contextlib import asynccontextmanager

from omni_ray.config import OmniConfig
from omni_ray.errors import OmniError, RequestCancelledError, is_client_error
from omni_ray.logs import bind_request_id, install_request_id_filter
from omni_ray.metrics import IngressMetrics, install_ingress, unwrap


def _status(error: BaseException | None, cancelled: bool) -> str:
    if error is None:
        return "completed"
    if cancelled or isinstance(error, (asyncio.CancelledError, RequestCancelledError)):
        return "cancelled"
    return "client_error" if is_client_error(unwrap(error)) else "failed"


class Ticket:
    """A request admitted without a scheduler: reports are no-ops, it is never cancelled."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.cancelled: asyncio.Event | None = None
        self.released = False
        self.meter = None            # callable(error): the ingress's request metrics and log line

    def _record(self, error: BaseException | None) -> None:
        if self.meter is not None and not self.released:
            self.meter(error)

    async def stage_started(self, stage: str) -> None:
        pass

    async def stage_finished(self, stage: str) -> None:
        pass

    @asynccontextmanager
    async def stage(self, stage: str):
        await self.stage_started(stage)
        try:
            yield
        finally:
            await self.stage_finished(stage)

    async def release(self, error: BaseException | None = None) -> None:
        self._record(error)
        self.released = True


class ScheduledTicket(Ticket):
    def __init__(self, client, ticket):
        super().__init__(ticket.request_id)
        self.client, self.ticket = client, ticket
        self.cancelled = ticket.cancelled

    async def stage_started(self, stage: str) -> None:
        if self.ticket.stage != stage or not self.ticket.holding:
            await self.client.enter_stage(self.request_id, stage)   # frees the last stage, waits for this one
        self.client.stage_started(self.request_id, stage)

    async def stage_finished(self, stage: str) -> None:
        self.client.stage_finished(self.request_id, stage)

    async def release(self, error: BaseException | None = None) -> None:
        if self.released:
            return
        self._record(error)
        self.released = True
        status = _status(error, self.ticket.is_cancelled)
        err = unwrap(error)
        msg = None if err is None else (err.message if isinstance(err, OmniError) else repr(err))
        self.client.finished(self.request_id, status, msg if status in ("failed", "client_error") else None)


class Admission:
    def __init__(self, config: OmniConfig):
        from deployments.services import replica_id

        self.enabled = config.scheduler.enabled
        self.client = None
        self.metrics = IngressMetrics(config.app.name, replica_id(), config.app.metrics)
        install_ingress(self.metrics)                 # HTTP error responses are counted too
        install_request_id_filter("ray.serve")
        if self.enabled:
            from omni_ray.cluster.admission import SchedulerClient
            self.client = SchedulerClient.connect(config.app.name, config.scheduler)

    async def admit(self, request_id: str, pipeline: str, stages: list[str], priority: str = "normal") -> Ticket:
        bind_request_id(request_id)                   # this task's log lines carry the id
        started = time.perf_counter()
        try:
            ticket = (Ticket(request_id) if self.client is None else
                      ScheduledTicket(self.client, await self.client.admit(request_id, pipeline, stages, priority)))
        except OmniError as err:                      # e.g. 429
            self.metrics.rejected(pipeline, err)
            raise
        ticket.meter = functools.partial(self.metrics.request_finished, request_id, pipeline, started)
        return ticket

    async def cancel(self, request_id: str) -> bool:
        return bool(self.client and await self.client.cancel(request_id))

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.close()
            except Exception:  # noqa: BLE001 - shutting down; the scheduler reaps silent clients
                pass

    async def status(self) -> dict:
        if self.client is None:
            return {"enabled": False}
        try:
            return {"enabled": True, **await self.client.get_status(), "client": dict(self.client.stats)}
        except OmniError as err:
            return {"enabled": True, "error": err.message}
