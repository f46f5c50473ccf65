"""Turn a stage's ``DeploymentConfig`` into ``Deployment.options(...)`` keyword arguments.

Deployment names are the stage keys (plus ``Ingress``): the KubeRay generator relies on them.
A stage that spans several ranks (tensor / CFG / sequence parallel) gets one placement group
bundle per rank; the replica actor itself sits in bundle 0, worker actors take the rest.
"""

from __future__ import annotations

from omni_ray.config import ARStageConfig, DeploymentConfig, DiTStageConfig, EncoderStageConfig


def num_ranks(stage: ARStageConfig | DiTStageConfig | EncoderStageConfig) -> int:
    if isinstance(stage, ARStageConfig):
        return stage.engine.parallel.tensor_parallel_size
    if isinstance(stage, EncoderStageConfig):
        return 1
    p = stage.engine.parallel
    return (2 if p.cfg_parallel else 1) * p.sequence_parallel_size


def placement_strategy(stage: ARStageConfig | DiTStageConfig | EncoderStageConfig) -> str:
    return "STRICT_PACK" if isinstance(stage, EncoderStageConfig) else stage.engine.parallel.placement_strategy


def deployment_options(name: str, d: DeploymentConfig, ranks: int = 1, strategy: str = "STRICT_PACK",
                       device: str = "auto") -> dict:
    opts: dict = {
        "name": name,
        "max_ongoing_requests": d.max_ongoing_requests,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
    }
    if d.resources:
        opts["ray_actor_options"]["resources"] = dict(d.resources)
    if d.autoscaling is not None:
        a = d.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas, "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
            "metrics_interval_s": a.metrics_interval_s, "look_back_period_s": a.look_back_period_s,
        }
    else:
        opts["num_replicas"] = d.num_replicas
    if ranks > 1:
        gpu = 0.0 if device == "cpu" else 1.0
        bundle = {"CPU": 1.0, "GPU": gpu} if gpu else {"CPU": 1.0}
        bundles = [dict(bundle) for _ in range(ranks)]
        bundles[0].update(d.resources)       # custom resources pin the replica (rank 0) to its node group
        opts["placement_group_bundles"] = bundles
        opts["placement_group_strategy"] = strategy
        # the replica actor is rank 0: it takes bundle 0 (its GPU included)
        opts["ray_actor_options"] = {"num_cpus": min(d.num_cpus, 1.0), "num_gpus": gpu} | (
            {"resources": dict(d.resources)} if d.resources else {})
    return opts


def stage_options(name: str, stage: ARStageConfig | DiTStageConfig | EncoderStageConfig, pinned: bool = False) -> dict:
    """``pinned``: a speech stage (talker, token2wav), whose ``feed`` calls go to the replica of their stream."""
    opts = deployment_options(name, stage.deployment, num_ranks(stage), placement_strategy(stage),
                              stage.engine.device)
    if pinned or isinstance(stage, ARStageConfig):     # aborts of batched streams, feeds: to their replica
        from deployments.stages.routing import ROUTER
        opts["request_router_config"] = {"request_router_class": ROUTER}
    return opts
