"""WorkerGroup: commands by collective broadcast, failures turned into EngineError, placement."""

from __future__ import annotations

import functools
import time

import pytest
import ray
import torch
import torch.distributed as dist

from omni_ray.cluster.worker_group import MAX_POST, WorkerGroup
from omni_ray.errors import ConfigError, EngineError
from tests.cluster.toy import make_toy

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


@pytest.fixture
def group(ray_up):
    g = WorkerGroup(2, functools.partial(make_toy, scale=2.0), device="cpu", timeout_s=30)
    yield g
    g.shutdown()


def test_call_post_and_gather(group):
    assert group.call("all_reduce", 3) == [6.0, 6.0, 6.0]             # 2*1 + 2*2 on every rank
    who = group.call_all("whoami")
    assert [w["rank"] for w in who] == [0, 1] and who[0]["pid"] != who[1]["pid"]
    for i in range(5):                                                  # post: no pickling, a header only
        group.post([i, i + 1, 7])
        x = torch.tensor([float(2 * i + 8)])
        dist.all_reduce(x, group=group.group)                           # rank 0's half of the post
        assert x.item() == 2 * (2 * i + 8)
    assert group.call_all("posted")[1] == [[i, i + 1, 7] for i in range(5)]
    with pytest.raises(ValueError):
        group.post(list(range(MAX_POST + 1)))
    group.check_health()


def test_one_live_group_per_process(group):
    with pytest.raises(ConfigError, match="already runs a live"):
        WorkerGroup(2, make_toy, device="cpu")
    assert group.call("all_reduce", 1) == [6.0]                       # the live one is untouched


def test_worker_error_fails_the_group_then_a_new_one_starts(ray_up):
    g = WorkerGroup(2, make_toy, device="cpu", timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"rank 1 of 2.*boom on rank 1"):
        g.call("boom")                       # rank 0 waits in an all-reduce that rank 1 never joins
    assert time.monotonic() - t0 < 20        # the worker tore its groups down: no collective timeout
    with pytest.raises(EngineError, match="rank 1"):
        g.check_health()
    with pytest.raises(EngineError, match="rank 1"):
        g.call("all_reduce", 1)
    # a failed group does not block the next one (shut down explicitly or not)
    g2 = WorkerGroup(2, make_toy, device="cpu", timeout_s=30)
    try:
        assert g2.call("all_reduce", 2) == [3.0, 3.0]
    finally:
        g2.shutdown()
        g.shutdown()


def test_killed_worker_is_reported(group):
    assert group.call("all_reduce", 1) == [6.0]
    ray.kill(group.actors[0], no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="rank 1 of 2 is gone"):
        while True:                                   # the kill lands asynchronously
            group.call("all_reduce", 1)
            assert time.monotonic() - t0 < 30
    with pytest.raises(EngineError):
        group.check_health()
    group.shutdown()
    group.shutdown()                                  # idempotent


def test_failure_callback_runs_without_a_call(ray_up):
    g = WorkerGroup(2, make_toy, device="cpu", timeout_s=30, watchdog_period_s=0.1)
    seen = []
    g.add_failure_callback(seen.append)
    try:
        ray.kill(g.actors[0], no_restart=True)
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen and isinstance(seen[0], EngineError) and "rank 1" in seen[0].message
    finally:
        g.shutdown()


@ray.remote(num_cpus=1)
class _ReplicaLike:
    """Stands in for a Serve replica started with placement_group_bundles: it sits in bundle 0."""

    def start(self):
        from ray.util import get_current_placement_group
        pg = get_current_placement_group()
        self.g = WorkerGroup(2, make_toy, device="cpu", placement_group=pg, timeout_s=30)
        who = self.g.call_all("whoami")
        return pg.id.hex(), who, self.g.call("all_reduce", 2)

    def stop(self):
        self.g.shutdown()


def test_group_inside_a_placement_group_uses_the_next_bundles(ray_up):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 1.0}, {"CPU": 1.0}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    replica = _ReplicaLike.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote()
    try:
        pg_id, who, total = ray.get(replica.start.remote(), timeout=120)
        assert pg_id == pg.id.hex()
        assert [w["rank"] for w in who] == [0, 1] and who[1]["placement_group"] == pg.id.hex()
        assert total == [3.0, 3.0]
        ray.get(replica.stop.remote(), timeout=60)
    finally:
        ray.kill(replica)
        remove_placement_group(pg)
