"""Fit an OmniConfig's deployments onto a KubeRay cluster spec.

Each GPU stage asks for a custom Ray resource (``deployment.resources: {ar_gpu: 1}``) that
exactly one worker group offers (``rayStartParams.resources``); CPU-only deployments (the
Ingress) live on the head. From that mapping each worker group's pod bounds follow from the
stages' replica bounds: ``pods = ceil(replicas / replicas_per_pod)``. Anything that does not
line up (a resource no group offers, a replica bigger than a pod, a GPU pod with CPUs left
for strangers, a group no stage uses) raises ``SizingError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from omni_ray.config import DeploymentConfig, OmniConfig

GPU_KEY = "nvidia.com/gpu"


class SizingError(ValueError):
    pass


@dataclass
class Node:
    """What one pod of a group offers to Ray's scheduler."""
    group: str
    cpus: float
    gpus: float
    custom: dict[str, float] = field(default_factory=dict)


@dataclass
class Need:
    """What one replica of a deployment asks for, and how many replicas there may be."""
    name: str
    cpus: float
    gpus: float
    custom: dict[str, float]
    min_replicas: int
    max_replicas: int


def parse_ray_resources(value: str) -> dict[str, float]:
    """``'"{\\"ar_gpu\\": 1}"'`` (KubeRay's shell-quoted JSON) -> ``{"ar_gpu": 1.0}``."""
    s = value.strip()
    if len(s) >= 2 and s[0] == s[-1] == '"':
        s = s[1:-1].replace('\\"', '"')
    try:
        parsed = json.loads(s)
    except json.JSONDecodeError as err:
        raise SizingError(f"rayStartParams.resources is not JSON: {value!r} ({err})") from None
    return {str(k): float(v) for k, v in parsed.items()}


def _quantity(v: str | int | float) -> float:
    """Kubernetes CPU/GPU quantity ("8", "500m", 2) -> float."""
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def node_of(group: dict, name: str) -> Node:
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = _quantity(params.get("num-gpus", limits.get(GPU_KEY, 0)))
    custom = parse_ray_resources(params["resources"]) if "resources" in params else {}
    return Node(name, cpus, gpus, custom)


def _need(name: str, d: DeploymentConfig) -> Need:
    if d.autoscaling is not None:
        lo, hi = d.autoscaling.min_replicas, d.autoscaling.max_replicas
    elif isinstance(d.num_replicas, int):
        lo = hi = d.num_replicas
    else:
        raise SizingError(f"{name}: num_replicas 'auto' has no bounds to size a cluster by; use autoscaling")
    return Need(name, d.num_cpus, d.num_gpus, dict(d.resources), lo, hi)


def needs_of(cfg: OmniConfig) -> list[Need]:
    return [_need("ingress", cfg.app.ingress)] + [_need(n, s.deployment) for n, s in cfg.stages.items()]


def per_node(need: Need, node: Node) -> int:
    """How many replicas of ``need`` one node holds (0: it does not fit)."""
    asks = {"CPU": need.cpus, "GPU": need.gpus, **need.custom}
    has = {"CPU": node.cpus, "GPU": node.gpus, **node.custom}
    counts = [math.floor(has.get(k, 0.0) / v + 1e-9) for k, v in asks.items() if v > 0]
    return min(counts) if counts else 0


def _group_of(need: Need, workers: list[Node]) -> Node | None:
    if not need.custom:
        if need.gpus > 0:
            raise SizingError(f"{need.name}: a GPU deployment must ask for its worker group's custom resource")
        return None  # CPU only: the head
    owners = [w for w in workers if all(k in w.custom for k in need.custom)]
    if len(owners) != 1:
        raise SizingError(f"{need.name}: resources {need.custom} must be offered by exactly one worker group, "
                          f"found {[w.group for w in owners]}")
    return owners[0]


def _check_head(head_needs: list[Need], head: Node) -> None:
    cpus = sum(n.cpus * n.max_replicas for n in head_needs)
    if cpus > head.cpus:
        raise SizingError(f"head: CPU deployments {[n.name for n in head_needs]} need {cpus} CPUs "
                          f"at max replicas, the head offers {head.cpus}")


def _pods(node: Node, needs: list[Need], cpu_needs: list[Need]) -> tuple[int, int]:
    lo = hi = 0
    for need in needs:
        k = per_node(need, node)
        if k == 0:
            raise SizingError(f"{need.name}: one replica does not fit a {node.group} pod ({node})")
        spare = node.cpus - k * need.cpus
        if any(0 < c.cpus <= spare for c in cpu_needs):
            raise SizingError(f"{node.group}: {spare} spare CPUs per pod would let CPU deployments land on "
                              f"GPU pods and keep them alive; set num-cpus to the stage's num_cpus")
        lo += math.ceil(need.min_replicas / k)
        hi += math.ceil(need.max_replicas / k)
    return lo, hi


def worker_bounds(cfg: OmniConfig, spec: dict) -> dict[str, tuple[int, int]]:
    """``{groupName: (min_pods, max_pods)}`` for a RayCluster spec, checking the fit."""
    head = node_of(spec["headGroupSpec"], "head")
    workers = [node_of(g, g["groupName"]) for g in spec.get("workerGroupSpecs", [])]
    by_group: dict[str, list[Need]] = {w.group: [] for w in workers}
    head_needs = []
    for need in needs_of(cfg):
        owner = _group_of(need, workers)
        (head_needs if owner is None else by_group[owner.group]).append(need)
    _check_head(head_needs, head)
    unused = [g for g, ns in by_group.items() if not ns]
    if unused:
        raise SizingError(f"worker groups {unused} host no stage")
    return {w.group: _pods(w, by_group[w.group], head_needs) for w in workers}
