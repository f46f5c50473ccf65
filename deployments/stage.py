"""What every stage replica shares: engine stats, Serve's health check, /health, shutdown.

A stage deployment sets ``self.stage``, ``self.engine`` (an async engine with ``stats``,
``check_health`` and ``shutdown``) and ``self.capacity`` (its CapacityReporter).
"""

from __future__ import annotations


class StageReplica:
    def stats(self) -> dict:
        return self.engine.stats()

    def check_health(self) -> None:      # Serve's periodic replica health check
        self.engine.check_health()
        self.capacity.refresh()

    def health(self) -> dict:             # the ingress's /health
        self.engine.check_health()
        return {"stage": self.stage, "status": "ok"}

    async def __del__(self):
        self.capacity.leave()
        await self.engine.shutdown()
