"""Request routing of the AR and speech stages: Serve's default, plus calls pinned to one replica.

A batched stage call (``ARDeployment.generate_batch``) runs several requests on one replica; to
abort one of them, the ingress calls ``abort(ids, replica=<its id>)``, and this router sends that
call to the replica named (Serve's power-of-two-choices for every other call, and for a replica
that is gone: an abort of an unknown id does nothing). The speech stages (talker, token2wav) route
the ``feed`` calls of a stream the same way, to the replica that runs it (``deployments/stages/fed.py``).
Configured per deployment with Serve's ``request_router_config`` (``deployments.options``); the router
runs in the caller's process.
"""

from __future__ import annotations

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter

ROUTER = "deployments.stages.routing:PinnedRouter"


class PinnedRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        target = pending_request.kwargs.get("replica") if pending_request is not None else None
        if target:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if pinned:
                return [pinned]
        return await super().choose_replicas(candidate_replicas, pending_request)
