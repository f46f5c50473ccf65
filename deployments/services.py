"""What a stage replica tells the cluster services: its capacity (scheduler), cached results (DiT cache).

Both are optional (``scheduler.enabled``, ``dit_cache.enabled``) and never fail a request: a
service that is down means no capacity report and cache misses.
"""

from __future__ import annotations

import logging

from omni_ray.config import DiTCacheConfig, OmniSchedulerConfig, validate

log = logging.getLogger("ray.serve")


def replica_id() -> str:
    from ray import serve
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests, offline)
        import os
        return f"local-{os.getpid()}"


class CapacityReporter:
    """Tells the app's scheduler how many requests this replica takes at once; re-sent on every
    health check, so a restarted scheduler (which starts empty) learns it again."""

    def __init__(self, services: dict | None, stage: str, capacity: int):
        services = services or {}
        self.cfg: OmniSchedulerConfig = validate(OmniSchedulerConfig, services.get("scheduler") or {"enabled": False})
        self.app, self.stage, self.capacity = services.get("app", "omni"), stage, capacity
        self.replica = replica_id()
        self.handle = None
        self.report(capacity)

    def report(self, capacity: int | None) -> None:
        if not self.cfg.enabled:
            return
        try:
            if self.handle is None:
                from omni_ray.cluster.admission import get_or_create_scheduler
                self.handle = get_or_create_scheduler(self.app, self.cfg)
            self.handle.report_capacity.remote(self.stage, self.replica, capacity)   # fire and forget
        except Exception as err:  # noqa: BLE001 - the scheduler is optional and fails open
            self.handle = None
            log.warning("capacity report to the scheduler failed: %r", err)

    def refresh(self) -> None:
        self.report(self.capacity)

    def leave(self) -> None:
        self.report(None)


def dit_cache(services: dict | None):
    """A DiTCacheClient for the app, or None when the cache is disabled."""
    services = services or {}
    cfg: DiTCacheConfig = validate(DiTCacheConfig, services.get("dit_cache") or {"enabled": False})
    if not cfg.enabled:
        return None
    from omni_ray.cluster.dit_cache import DiTCacheClient
    return DiTCacheClient.connect(services.get("app", "omni"), cfg)
