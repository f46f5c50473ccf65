"""OmniScheduler: cluster-wide admission, tracking and cancellation of omni requests.

One named async Ray actor per application (``omni-scheduler-{app}``, namespace ``omni_ray``,
0 CPUs, ``max_restarts=-1``, detached by default) holds the queues; each ingress replica talks
to it through a ``SchedulerClient`` that batches its calls and keeps its own tickets, so the
actor is neither a bottleneck nor a single point of failure (see ``client.py`` for the
fail-open rule). Only ids, names and numbers travel; tensors never do.

Usage in an ingress replica::

    client = SchedulerClient.connect(app_name, cfg.scheduler)      # in __init__ (creates the actor)
    ticket = await client.admit(rid, "text2image", ["llm", "dit"], priority="high")
                                       # waits for a slot on "llm"; QueueFullError (429, .retry_after)
    client.stage_started(rid, "llm")   # tracking: the engine call began
    ...                                # run it; abort when ticket.cancelled is set
    client.stage_finished(rid, "llm")
    await client.enter_stage(rid, "dit")   # optional gate: frees "llm", waits for a slot on "dit"
    client.stage_started(rid, "dit"); client.stage_finished(rid, "dit")
    client.finished(rid, "completed")  # or "failed" (error=...) / "cancelled" / "client_error" (a 4xx,
                                       # counted apart from failures); frees everything

    await client.cancel(rid)           # from any replica: True if the request was live
    ticket.cancelled                   # asyncio.Event, set when cancelled (also ticket.wait_cancelled())
    client.on_cancel(fn); client.cancelled_ids(); client.is_cancelled(rid)
    client.report_capacity("dit", replica_id, 8)   # a replica's concurrency (None: it left)

Deployments may instead call the actor directly: ``get_or_create_scheduler(app, cfg)``
``.report_capacity.remote(stage, replica_id, capacity)``. Monitoring (actor methods, also on the
client as coroutines): ``get_status()``, ``get_metrics()``, ``get_health_status()``,
``get_queue_depth()`` (per stage, for autoscaling), ``get_request(rid)`` (state, per-stage
timestamps, history), ``cancel(rid)``.

Policies: ``fifo``, or ``priority`` = weighted fair queueing over high/normal/low with
``priority_weights`` (default 4:2:1; low is never starved). Each stage admits up to the sum of
its replicas' reported capacities (``default_stage_capacity`` until one reports). At most
``max_queue_size`` requests wait for admission; beyond, ``QueueFullError`` with
``retry_after = retry_after_s``. Cancelling a queued request ends it; cancelling a running one
tells its owning replica (in the reply of its next call, or at once through its long poll),
which aborts the engine call and reports ``finished(rid, "cancelled")``.
"""

from omni_ray.cluster.admission.actor import OmniScheduler, get_or_create_scheduler, kill_scheduler, scheduler_name
from omni_ray.cluster.admission.client import SchedulerClient, Ticket
from omni_ray.cluster.admission.core import SchedulerCore
from omni_ray.cluster.admission.queue import PRIORITIES, FairQueue

__all__ = ["OmniScheduler", "SchedulerClient", "SchedulerCore", "Ticket", "FairQueue", "PRIORITIES",
           "get_or_create_scheduler", "kill_scheduler", "scheduler_name"]
