"""The OmniScheduler Ray actor: one per application, named ``omni-scheduler-{app}`` in namespace
``omni_ray``. An async actor over ``SchedulerCore``: clients ``sync`` batches of events and
long-``poll`` for what happens later (grants, cancellations), so thousands of waiting requests
cost one parked coroutine per client, not one call each. Restarted by Ray when it dies
(``max_restarts=-1``); a restart starts empty and clients re-register what they hold.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import ray

from omni_ray.cluster import named_actor
from omni_ray.cluster.admission.core import SchedulerCore
from omni_ray.config import OmniSchedulerConfig
from omni_ray.metrics import SchedulerMetrics

REAP_EVERY_S = 1.0


def scheduler_name(app_name: str) -> str:
    return f"omni-scheduler-{app_name}"


class OmniScheduler:
    def __init__(self, app_name: str, config: OmniSchedulerConfig):
        self.app_name = app_name
        self.cfg = config
        self.core = SchedulerCore(config)
        self.incarnation = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.wake: dict[str, asyncio.Event] = {}
        self.reaper: asyncio.Task | None = None
        self.cache = None
        self.metrics = SchedulerMetrics(app_name, scheduler_name(app_name))

    # ------------------------------------------------------------------ client protocol
    async def sync(self, client_id: str, events: list) -> dict:
        self._ensure_reaper()
        self.core.handle(client_id, events)
        reply = self._reply(client_id)          # our own news goes back now; wake the others' polls
        self._wake_dirty()
        return reply

    async def poll(self, client_id: str, timeout_s: float) -> dict:
        """Return at once if the client has news, else when news arrives or after ``timeout_s``."""
        self._ensure_reaper()
        self.core.seen[client_id] = time.time()
        if client_id not in self.core.dirty:
            ev = self.wake.setdefault(client_id, asyncio.Event())
            ev.clear()
            try:
                await asyncio.wait_for(ev.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        self.core.seen[client_id] = time.time()
        return self._reply(client_id)

    def _reply(self, client_id: str) -> dict:
        out = self.core.take(client_id)
        out["incarnation"] = self.incarnation
        return out

    def _wake_dirty(self) -> None:
        for c in self.core.dirty:
            ev = self.wake.get(c)
            if ev is not None:
                ev.set()

    def _ensure_reaper(self) -> None:
        if self.reaper is None or self.reaper.done():
            self.reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            if self.core.reap():
                self._wake_dirty()
            self.metrics.record(self.core.queue_depth())     # Prometheus gauge per stage
            for c in [c for c in self.wake if c not in self.core.seen]:
                self.wake.pop(c).set()

    # ------------------------------------------------------------------ operator API
    async def ping(self) -> str:
        return self.incarnation

    async def cancel(self, request_id: str) -> bool:
        ok = self.core.cancel(request_id)
        self._wake_dirty()
        return ok

    async def report_capacity(self, stage: str, replica_id: str, capacity: int | None) -> None:
        self.core.set_capacity(stage, replica_id, capacity)
        self._wake_dirty()

    async def get_request(self, request_id: str) -> dict | None:
        return self.core.request(request_id)

    async def get_queue_depth(self) -> dict[str, int]:
        return self.core.queue_depth()

    async def get_status(self) -> dict:
        out = self.core.status()
        out.update(app=self.app_name, incarnation=self.incarnation, uptime_s=time.time() - self.started)
        cache = await self._cache_stats()
        out["cache"] = cache
        out["cache_hit_rate"] = cache["hit_rate"] if cache else None
        return out

    async def get_metrics(self) -> dict:
        out = self.core.metrics_summary()
        cache = await self._cache_stats()
        out["cache_utilization"] = (cache["bytes"] / cache["max_bytes"] if cache and cache["max_bytes"] else None)
        out["cache_hit_rate"] = cache["hit_rate"] if cache else None
        return out

    async def get_health_status(self) -> dict:
        return self.core.health()

    async def _cache_stats(self) -> dict | None:
        """The application's DiT cache statistics, when that actor exists."""
        from omni_ray.cluster.dit_cache import cache_name
        try:
            if self.cache is None:
                self.cache = await asyncio.to_thread(named_actor.lookup, cache_name(self.app_name))
            return await asyncio.wait_for(self.cache.stats.remote(), 1.0)
        except (ValueError, ray.exceptions.RayError, asyncio.TimeoutError):
            self.cache = None
            return None


def get_or_create_scheduler(app_name: str, config: OmniSchedulerConfig):
    """The application's scheduler actor handle (created on first use; 0 CPUs)."""
    return named_actor.get_or_create(OmniScheduler, scheduler_name(app_name), app_name, config,
                                     detached=config.detached, max_concurrency=4096)


def kill_scheduler(app_name: str) -> bool:
    """Stop the application's scheduler for good (app teardown)."""
    return named_actor.kill(scheduler_name(app_name))
