"""The application's named Ray actors (admission scheduler, DiT cache): one get-or-create, lookup
and kill for all of them, in one namespace."""

from __future__ import annotations

import ray

NAMESPACE = "omni_ray"


def get_or_create(cls, name: str, *args, detached: bool = False, **options):
    """The handle of actor ``name``, created from ``cls(*args)`` on first use: 0 CPUs, restarted by
    Ray when it dies (a restart starts empty), no task retries; ``options`` add to / override these."""
    opts = dict(name=name, namespace=NAMESPACE, get_if_exists=True, max_restarts=-1, max_task_retries=0,
                num_cpus=0, **options)
    if detached:
        opts["lifetime"] = "detached"
    return ray.remote(cls).options(**opts).remote(*args)


def lookup(name: str):
    """The handle of actor ``name`` (ValueError when there is none)."""
    return ray.get_actor(name, namespace=NAMESPACE)


def kill(name: str) -> bool:
    """Stop actor ``name`` for good; False when there was none."""
    try:
        ray.kill(lookup(name), no_restart=True)
        return True
    except ValueError:
        return False
