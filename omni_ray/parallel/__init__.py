"""Parallel workers: a ``WorkerGroup`` is rank 0 (this process) plus Ray actors holding the other
ranks, driven by collective broadcast; ``tp_runner.TPModelRunner`` spreads the AR engine over it."""

from omni_ray.parallel.group import RankContext, WorkerGroup

__all__ = ["RankContext", "WorkerGroup"]
