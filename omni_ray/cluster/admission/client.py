"""SchedulerClient: the scheduler as seen from an ingress replica.

Calls are batched: events go to a local outbox and one ``sync`` call (at most one in flight,
so the actor sees each client's events in order) carries everything that piled up meanwhile.
Admissions and stage gates are urgent and go at once; reports (stage started/finished,
finished, capacity) ride along with the next call or go after ``flush_interval_s`` (2 ms), so
a finish never delays the next admission by a round trip. A busy replica thus makes a few
hundred actor calls a second however many requests it admits.
A long ``poll`` (one per replica, while it has live requests or a lease) brings back grants for queued
requests and cancellations made elsewhere. Only ids, names and numbers travel, never tensors.
While a stage has no queue the actor lends the client a few of its slots (``admission_lease``):
an admission to that stage then takes one at once, with no round trip, and is reported with the
next batch; a lease the actor takes back (a queue formed) is returned unused.

Failure of the actor (fail open, bounded): calls that fail or time out mark the scheduler down.
Admitted requests carry on untouched (their tickets live here). Requests waiting for a slot
wait at most ``unavailable_wait_s`` more, then are admitted locally (``ticket.local = True``)
without the global limits; the deployments' own ``max_ongoing_requests`` still bound the load.
The client re-resolves the actor (``get_if_exists``: a restarted or re-created one), replays
what it holds (``resync`` + ``register``), and admission goes through the actor again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Callable

import ray

from omni_ray.cluster.admission.actor import get_or_create_scheduler
from omni_ray.cluster.admission.queue import PRIORITIES
from omni_ray.config import OmniSchedulerConfig
from omni_ray.errors import InvalidRequestError, QueueFullError, RequestCancelledError, SchedulerError

log = logging.getLogger(__name__)
POLL_S = 1.0
STATUSES = ("completed", "failed", "cancelled", "client_error")


class Ticket:
    """An admitted request, held by the replica that owns it."""

    def __init__(self, request_id: str, pipeline: str, stages: tuple[str, ...], priority: str, t_queued: float):
        self.request_id, self.pipeline, self.stages, self.priority = request_id, pipeline, stages, priority
        self.stage: str | None = None        # the stage it was last granted / started
        self.holding = False                 # holds a slot on ``stage``
        self.local = False                   # admitted here while the scheduler was down
        self.t_queued, self.t_admitted = t_queued, None
        self.cancelled = asyncio.Event()

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    async def wait_cancelled(self) -> None:
        await self.cancelled.wait()

    def __repr__(self) -> str:
        return f"Ticket({self.request_id!r}, stage={self.stage!r}, local={self.local})"


class _Wait:
    __slots__ = ("fut", "ticket", "stage", "t0")

    def __init__(self, fut, ticket, stage, t0):
        self.fut, self.ticket, self.stage, self.t0 = fut, ticket, stage, t0


class SchedulerClient:
    def __init__(self, app_name: str, config: OmniSchedulerConfig | None = None, *, client_id: str | None = None):
        self.app_name = app_name
        self.cfg = config or OmniSchedulerConfig()
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.handle = None
        self.incarnation: str | None = None
        self.down_since: float | None = None
        self.stats = {"calls": 0, "events": 0, "fail_open": 0, "resyncs": 0, "leased": 0}
        self._credits: dict[str, int] = {}         # stage -> lent slots not used yet
        self._outbox: list = []
        self._resync = False
        self._waits: dict[str, _Wait] = {}
        self._tickets: dict[str, Ticket] = {}
        self._capacity: dict[tuple[str, str], int | None] = {}
        self._callbacks: list[Callable[[str], None]] = []
        self._urgent = False
        self._lazy: asyncio.TimerHandle | None = None
        self._pump_task: asyncio.Task | None = None
        self._poll_task: asyncio.Task | None = None
        self._failopen_task: asyncio.Task | None = None

    @classmethod
    def connect(cls, app_name: str, config: OmniSchedulerConfig | None = None, **kw) -> "SchedulerClient":
        """A client for ``app_name``'s scheduler, creating the actor if it does not exist yet."""
        client = cls(app_name, config, **kw)
        if client.cfg.enabled:
            if not ray.is_initialized():
                raise SchedulerError("Ray is not initialized: the scheduler client needs a Ray cluster")
            client.handle = get_or_create_scheduler(app_name, client.cfg)
        return client

    # ------------------------------------------------------------------ request lifecycle
    async def admit(self, request_id: str, pipeline: str, stages, priority: str = "normal") -> Ticket:
        """Wait until ``stages[0]`` has a slot. Raises QueueFullError (429) past the queue bound,
        RequestCancelledError if cancelled while queued."""
        stages = self._check_new(request_id, stages, priority)
        now = time.time()
        ticket = Ticket(request_id, pipeline, stages, priority, now)
        if not self.cfg.enabled:
            return self._take(ticket, stages[0])
        if self._credits.get(stages[0], 0) > 0 and self.down_since is None and not self._resync:
            self._credits[stages[0]] -= 1               # a lent slot: admitted now, reported lazily
            self.stats["leased"] += 1
            self._take(ticket, stages[0])
            self._send(("lease_admit", request_id, pipeline, stages, priority, now))
            self._ensure_poll()
            return ticket
        await self._wait(ticket, stages[0], ("admit", request_id, pipeline, stages, priority, now))
        return ticket

    async def enter_stage(self, request_id: str, stage: str) -> Ticket:
        """Free the held slot and wait for one on ``stage`` (a later stage of the pipeline)."""
        ticket = self._ticket(request_id)
        if ticket.is_cancelled:
            raise RequestCancelledError(f"request {request_id} was cancelled")
        if not self.cfg.enabled:
            return self._take(ticket, stage)
        ticket.holding = False                  # the actor frees the held slot on "enter"
        await self._wait(ticket, stage, ("enter", request_id, stage, time.time()))
        return ticket

    def stage_started(self, request_id: str, stage: str) -> None:
        """The stage's engine call began (takes a slot there without waiting if none is held)."""
        ticket = self._tickets.get(request_id)
        if ticket is not None:
            ticket.stage, ticket.holding = stage, True
            self._send(("start", request_id, stage, time.time()))

    def stage_finished(self, request_id: str, stage: str) -> None:
        ticket = self._tickets.get(request_id)
        if ticket is not None:
            if ticket.stage == stage:
                ticket.holding = False
            self._send(("stage_done", request_id, stage, time.time()))

    def finished(self, request_id: str, status: str = "completed", error: str | None = None) -> None:
        """Terminal: frees whatever the request holds. Unknown or already finished ids are ignored."""
        if status not in STATUSES:
            raise InvalidRequestError(f"status must be one of {STATUSES}, got {status!r}", param="status")
        wait = self._waits.pop(request_id, None)
        if self._tickets.pop(request_id, None) is None and wait is None:
            return
        if wait is not None and not wait.fut.done():
            wait.fut.set_exception(RequestCancelledError(f"request {request_id} finished while waiting"))
        self._send(("finish", request_id, status, None if error is None else str(error)[:500], time.time()))

    # ------------------------------------------------------------------ cancellation
    async def cancel(self, request_id: str) -> bool:
        """Cancel a request wherever it is owned. Returns False for an unknown or finished id."""
        if request_id in self._waits or request_id in self._tickets:
            self._on_cancel(request_id)
            return True
        if not self.cfg.enabled:
            return False
        return await self._call("cancel", request_id)

    def is_cancelled(self, request_id: str) -> bool:
        t = self._tickets.get(request_id)
        return t is not None and t.is_cancelled

    def cancelled_ids(self) -> set[str]:
        """Live requests of this replica that were cancelled (abort their engine calls)."""
        return {rid for rid, t in self._tickets.items() if t.is_cancelled}

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        """``callback(request_id)`` runs on this event loop when one of our requests is cancelled."""
        self._callbacks.append(callback)

    # ------------------------------------------------------------------ capacity and reports
    def report_capacity(self, stage: str, replica_id: str, capacity: int | None) -> None:
        """A replica's concurrency for ``stage`` (None: the replica is gone). Kept and replayed."""
        self._capacity[(stage, replica_id)] = capacity
        self._send(("capacity", stage, replica_id, capacity))

    async def get_status(self) -> dict:
        return await self._call("get_status")

    async def get_metrics(self) -> dict:
        return await self._call("get_metrics")

    async def get_health_status(self) -> dict:
        return await self._call("get_health_status")

    async def get_queue_depth(self) -> dict:
        return await self._call("get_queue_depth")

    async def get_request(self, request_id: str) -> dict | None:
        return await self._call("get_request", request_id)

    @property
    def live(self) -> int:
        return len(self._tickets) + len(self._waits)

    async def flush(self) -> None:
        """Wait until every buffered event has reached the actor (or it is found down)."""
        if self._outbox:
            self._send_now()
        while self._pump_task is not None and not self._pump_task.done():
            await asyncio.shield(self._pump_task)

    async def close(self) -> None:
        if self.down_since is None:
            await asyncio.wait_for(self.flush(), self.cfg.call_timeout_s)
        if self._lazy is not None:
            self._lazy.cancel()
        for task in (self._pump_task, self._poll_task, self._failopen_task):
            if task is not None:
                task.cancel()

    # ------------------------------------------------------------------ local state
    def _check_new(self, rid, stages, priority) -> tuple[str, ...]:
        if not isinstance(rid, str) or not rid:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if rid in self._tickets or rid in self._waits:
            raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
        if priority not in PRIORITIES:
            raise InvalidRequestError(f"priority must be one of {PRIORITIES}, got {priority!r}", param="priority")
        stages = tuple(stages or ())
        if not stages or not all(isinstance(s, str) and s for s in stages):
            raise InvalidRequestError("a request needs a non-empty list of stage names", param="stages")
        return stages

    def _ticket(self, rid: str) -> Ticket:
        t = self._tickets.get(rid)
        if t is None:
            raise InvalidRequestError(f"request {rid!r} is not admitted here (or already finished)")
        return t

    def _take(self, ticket: Ticket, stage: str) -> Ticket:
        ticket.stage, ticket.holding = stage, True
        if ticket.t_admitted is None:
            ticket.t_admitted = time.time()
        self._tickets[ticket.request_id] = ticket
        return ticket

    async def _wait(self, ticket: Ticket, stage: str, event: tuple) -> None:
        rid = ticket.request_id
        fut = asyncio.get_running_loop().create_future()
        self._waits[rid] = _Wait(fut, ticket, stage, time.time())
        self._send(event, urgent=True)
        self._ensure_poll()
        if self.down_since is not None:
            self._ensure_failopen()
        try:
            await fut
        except asyncio.CancelledError:          # the caller gave up (client disconnect, timeout)
            self._waits.pop(rid, None)
            self._tickets[rid] = ticket
            self.finished(rid, "cancelled", "the caller stopped waiting")
            raise

    def _on_grant(self, rid: str, stage: str) -> None:
        w = self._waits.get(rid)
        if w is None or w.stage != stage:
            return                              # withdrawn meanwhile; its finish event frees the slot
        del self._waits[rid]
        self._take(w.ticket, stage)
        if not w.fut.done():
            w.fut.set_result(w.ticket)

    def _on_reject(self, rid: str, kind: str, msg: str) -> None:
        w = self._waits.pop(rid, None)
        if w is None or w.fut.done():
            return
        if kind == "queue_full":
            err = QueueFullError(msg, retry_after=self.cfg.retry_after_s)
        elif kind == "invalid":
            err = InvalidRequestError(msg, param="request_id")
        else:
            err = SchedulerError(msg)
        w.fut.set_exception(err)

    def _on_cancel(self, rid: str) -> None:
        w = self._waits.pop(rid, None)
        ticket = w.ticket if w is not None else self._tickets.get(rid)
        if ticket is None or ticket.is_cancelled:
            return
        ticket.cancelled.set()
        if w is not None:                       # cancelled while waiting for a slot: end it here
            if not w.fut.done():
                w.fut.set_exception(RequestCancelledError(f"request {rid} was cancelled"))
            self._tickets.pop(rid, None)
            self._send(("finish", rid, "cancelled", "cancelled while queued", time.time()))
        else:                                   # running: the owner aborts, then finished(cancelled)
            self._send(("cancel_req", rid, time.time()))
        for cb in self._callbacks:
            try:
                cb(rid)
            except Exception:                   # a bad callback must not break the client
                log.exception("scheduler cancel callback failed for %s", rid)

    def _apply(self, reply: dict, resynced: bool = False) -> None:
        inc = reply["incarnation"]
        if self.incarnation is not None and inc != self.incarnation and not resynced:
            self._resync = True                 # restarted since our last call: replay what we hold
            self._ensure_pump()
        self.incarnation = inc
        for rid, stage in reply["granted"]:
            self._on_grant(rid, stage)
        for rid, kind, msg in reply["rejected"]:
            self._on_reject(rid, kind, msg)
        for rid in reply["cancelled"]:
            self._on_cancel(rid)
        for stage, n in reply.get("leased", ()):
            self._credits[stage] = self._credits.get(stage, 0) + n
        if self._credits:
            self._ensure_poll()                 # an idle holder must still hear a revoke at once
        for stage in reply.get("revoked", ()):
            n = self._credits.pop(stage, 0)
            if n:
                self._send(("lease_return", stage, n, time.time()), urgent=True)

    def _resync_events(self) -> list:
        self.stats["resyncs"] += 1
        self._credits.clear()                   # the actor drops our lease on "resync"
        evs: list = [("resync", list(self._tickets) + list(self._waits))]
        evs += [("capacity", s, r, c) for (s, r), c in self._capacity.items()]
        for rid, t in self._tickets.items():
            evs.append(("register", rid, t.pipeline, t.stages, t.priority, t.stage if t.holding else None,
                        t.t_queued, t.t_admitted or t.t_queued))
        for rid, w in self._waits.items():
            t = w.ticket
            if rid in self._tickets:
                evs.append(("enter", rid, w.stage, w.t0))
            else:
                evs.append(("admit", rid, t.pipeline, t.stages, t.priority, t.t_queued))
        return evs

    # ------------------------------------------------------------------ talking to the actor
    def _send(self, event: tuple, urgent: bool = False) -> None:
        if not self.cfg.enabled:
            return
        self._outbox.append(event)
        if urgent:
            self._send_now()
        elif self._lazy is None and not self._pumping():
            self._lazy = asyncio.get_running_loop().call_later(self.cfg.flush_interval_s, self._send_now)

    def _send_now(self) -> None:
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None
        self._urgent = True
        self._ensure_pump()

    def _pumping(self) -> bool:
        return self._pump_task is not None and not self._pump_task.done()

    def _ensure_pump(self) -> None:
        if not self._pumping():
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    def _ensure_poll(self) -> None:
        if self.down_since is None and (self._poll_task is None or self._poll_task.done()):
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    def _ensure_failopen(self) -> None:
        if self._failopen_task is None or self._failopen_task.done():
            self._failopen_task = asyncio.get_running_loop().create_task(self._failopen())

    async def _pump(self) -> None:
        backoff = 0.05
        while self._urgent or self._resync or self.down_since is not None:
            if self.down_since is not None or self.handle is None:
                if not await self._reconnect():
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, 0.5)
                    continue
                backoff = 0.05
            resync = self._resync_events() if self._resync else []
            self._resync = self._urgent = False
            batch, self._outbox = resync + self._outbox, []
            if not batch:
                continue
            try:
                self.stats["calls"] += 1
                self.stats["events"] += len(batch)
                reply = await _result(self.handle.sync.remote(self.client_id, batch), self.cfg.call_timeout_s)
            except ray.exceptions.RayTaskError as e:   # a bug, not an outage: do not replay the batch
                log.error("scheduler rejected a batch: %s", e)
                for ev in batch:
                    if ev[0] in ("admit", "enter") and ev[1] in self._waits:
                        self._on_reject(ev[1], "error", f"scheduler error: {e}")
                continue
            except Exception as e:                      # down, restarting or too slow: replay later
                self._outbox[:0] = batch[len(resync):]
                self._urgent = True
                self._mark_down(e)
                continue
            self._apply(reply, resynced=bool(resync))
        if self._outbox and self._lazy is None:     # reports only: let them wait for company
            self._lazy = asyncio.get_running_loop().call_later(self.cfg.flush_interval_s, self._send_now)

    async def _poll(self) -> None:
        while ((self._waits or self._tickets or any(self._credits.values())) and self.down_since is None
               and self.handle is not None):
            try:
                reply = await _result(self.handle.poll.remote(self.client_id, POLL_S), POLL_S + self.cfg.call_timeout_s)
            except Exception as e:
                self._mark_down(e)
                return
            self._apply(reply)

    async def _reconnect(self) -> bool:
        try:
            if self.handle is None:
                self.handle = await asyncio.to_thread(get_or_create_scheduler, self.app_name, self.cfg)
            await _result(self.handle.ping.remote(), self.cfg.call_timeout_s)
        except Exception as e:
            log.debug("scheduler still unavailable: %s", e)
            self.handle = None
            self._mark_down(e)
            return False
        if self.down_since is not None:
            log.warning("scheduler %s reachable again; replaying %d live request(s)", self.app_name, self.live)
            self.down_since = None
            self._resync = True
        self._ensure_poll()
        return True

    def _mark_down(self, err: Exception) -> None:
        self._credits.clear()
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("scheduler %s unavailable (%s: %s); failing open after %.1fs",
                        self.app_name, type(err).__name__, err, self.cfg.unavailable_wait_s)
        self._ensure_pump()
        self._ensure_failopen()

    async def _failopen(self) -> None:
        """While the actor is down, admit locally whatever has waited ``unavailable_wait_s``."""
        while self.down_since is not None and self._waits:
            now = time.time()
            for rid, w in list(self._waits.items()):
                if now - max(self.down_since, w.t0) >= self.cfg.unavailable_wait_s:
                    w.ticket.local = True
                    self.stats["fail_open"] += 1
                    self._on_grant(rid, w.stage)
            await asyncio.sleep(0.05)

    async def _call(self, method: str, *args):
        """A direct (unbatched) call for the operator API; SchedulerError if unreachable."""
        try:
            if self.handle is None:
                self.handle = await asyncio.to_thread(get_or_create_scheduler, self.app_name, self.cfg)
            return await _result(getattr(self.handle, method).remote(*args), self.cfg.call_timeout_s)
        except Exception as e:
            raise SchedulerError(f"scheduler {self.app_name!r} unavailable: {type(e).__name__}: {e}") from e


async def _result(ref, timeout_s: float):
    """``await ref`` with a timeout, without ``asyncio.wait_for``'s extra task per call."""
    fut = asyncio.wrap_future(ref.future())
    expired: list = []
    timer = asyncio.get_running_loop().call_later(timeout_s, _expire, fut, expired)
    try:
        return await fut
    except asyncio.CancelledError:
        if expired:
            raise asyncio.TimeoutError(f"scheduler call timed out after {timeout_s:g}s") from None
        raise
    finally:
        timer.cancel()


def _expire(fut: asyncio.Future, expired: list) -> None:
    expired.append(True)
    fut.cancel()
