"""The ingress's ``/info``: versions, stages (with their replicas' info and stats), pipelines, scheduler."""

import asyncio
import platform

from deployments.ingress.http import as_omni


async def describe(config, handles: dict, kinds: dict, names: dict, admission) -> dict:
    import ray
    import torch

    import omni_ray

    async def stage(k: str) -> dict:
        try:
            meta, stats = await asyncio.gather(handles[k].info.remote(), handles[k].stats.remote())
            return meta | {"stats": stats}
        except Exception as err:  # noqa: BLE001 - report, do not fail /info
            return {"kind": kinds[k], "model": names[k], "error": as_omni(err).message}

    keys = list(handles)
    stages = dict(zip(keys, await asyncio.gather(*(stage(k) for k in keys))))
    for k in keys:
        stages[k]["deployment"] = config.stages[k].deployment.model_dump()
    return {
        "app": config.app.name,
        "versions": {"omni_ray": omni_ray.__version__, "ray": ray.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "models": [names[k] for k in keys],
        "stages": stages,
        "pipelines": {n: {"description": p.description, "steps": [s.model_dump(exclude_none=True)
                                                                  for s in p.steps]}
                      for n, p in config.pipelines.items()},
        "scheduler": await admission.status(),
    }
