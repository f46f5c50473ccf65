"""DiT cache: keys and the eviction index (plain Python), then the object-store-backed actor on
a local Ray cluster (hits from the object store, budgets, TTL, invalidation, actor and producer
deaths)."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
import torch

from omni_ray.cluster.dit_cache import (
    CacheIndex,
    DiTCacheClient,
    conditioning_key,
    get_or_create_cache,
    image_key,
    key_model,
    kill_cache,
    nbytes_of,
)
from omni_ray.config import DiTCacheConfig
from omni_ray.errors import CacheError


# ----------------------------------------------------------------------------- keys
def test_keys_are_canonical_and_model_scoped():
    a = image_key("pixart", "a fox", {"seed": 1, "steps": 20, "size": [64, 64]})
    b = image_key("pixart", "a fox", {"size": [64, 64], "steps": 20, "seed": 1})
    assert a == b and a.startswith("img/") and key_model(a) == "pixart"
    assert a != image_key("pixart", "a fox", {"seed": 2, "steps": 20, "size": [64, 64]})
    assert a != image_key("sd3", "a fox", {"seed": 1, "steps": 20, "size": [64, 64]})
    assert image_key("pixart", "a fox", {"steps": 20}) is None            # no seed: never image-cached
    assert image_key("pixart", "a fox", {"seed": None}) is None
    c = conditioning_key("tiny:qwen3", "a fox", "ar_hidden", layer=-1)
    assert key_model(c) == "tiny:qwen3" and c != conditioning_key("tiny:qwen3", "a fox", "ar_hidden", layer=-2)
    assert c != conditioning_key("tiny:qwen3", "a fox", "t5", layer=-1)
    with pytest.raises(CacheError):
        conditioning_key("m", "p", "t5", bad=object())


def test_nbytes_of():
    t = torch.zeros(10, 4, dtype=torch.float16)
    assert nbytes_of(t) == 80 and nbytes_of(b"abc") == 3
    assert nbytes_of({"a": t, "b": [t, t]}) == 1 + 80 + 1 + 160


# ----------------------------------------------------------------------------- the index
class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def index(strategy, max_bytes=300, ttl_s=10.0):
    clock = Clock()
    return CacheIndex(DiTCacheConfig(strategy=strategy, max_bytes=max_bytes, ttl_s=ttl_s), clock=clock), clock


def test_lru_evicts_least_recently_used():
    ix, _ = index("lru")
    for k in "abc":
        ix.put(k, k, 100, "m")
    assert ix.get("a") is not None                      # b is now the least recent
    assert ix.put("d", "d", 100, "m") == ["b"]
    assert ix.put("e", "e", 150, "m") == ["c", "a"] and ix.bytes == 250
    assert set(ix.entries) == {"d", "e"} and ix.counts["evictions"] == 3


def test_fifo_evicts_the_oldest_put_whatever_its_hits():
    ix, _ = index("fifo")
    for k in "abc":
        ix.put(k, k, 100, "m")
    assert ix.get("a") is not None and ix.get("a") is not None      # hits do not keep a in (lru would)
    assert ix.put("d", "d", 100, "m") == ["a"]
    ix.put("b", "b2", 100, "m")                                      # a new put of b: b is the newest now
    assert ix.put("e", "e", 100, "m") == ["c"]
    assert list(ix.entries) == ["d", "b", "e"] and ix.get("b").ref == "b2"


def test_lfu_evicts_least_frequently_used():
    ix, _ = index("lfu")
    for k in "abc":
        ix.put(k, k, 100, "m")
    for k, n in {"a": 3, "b": 1, "c": 2}.items():
        for _ in range(n):
            ix.get(k)
    assert ix.put("d", "d", 100, "m") == ["b"]
    assert ix.put("e", "e", 100, "m") == ["d"]           # d: 0 hits, fewer than c's 2
    with pytest.raises(CacheError):
        ix.put("huge", "x", 301, "m")
    assert ix.counts["rejected"] == 1 and ix.bytes == 300


def test_ttl_expires_and_evicts_soonest_first():
    ix, clock = index("ttl", ttl_s=10.0)
    ix.put("a", "a", 100, "m")
    clock.t = 5.0
    ix.put("b", "b", 100, "m", ttl_s=100.0)
    ix.put("c", "c", 100, "m")
    assert ix.put("d", "d", 100, "m") == ["a"]            # a expires first (t=10)
    clock.t = 15.1
    assert ix.get("c") is None and ix.get("b") is not None and ix.counts["expirations"] == 1
    assert ix.expire() == 1 and list(ix.entries) == ["b"] and ix.bytes == 100      # d went too


def test_invalidate_and_stats():
    ix, _ = index("lru", max_bytes=1000)
    for k, m in [("a", "m1"), ("b", "m1"), ("c", "m2")]:
        ix.put(k, k, 10, m)
    assert ix.invalidate("a") and not ix.invalidate("a")
    assert ix.invalidate_model("m1") == 1 and list(ix.entries) == ["c"]
    ix.get("c")
    ix.get("zz")
    st = ix.stats()
    assert (st["hits"], st["misses"], st["hit_rate"], st["entries"], st["bytes"], st["invalidations"]) == \
        (1, 1, 0.5, 1, 10, 2)


# ----------------------------------------------------------------------------- on Ray
def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def tensor(i: int, n: int = 256) -> torch.Tensor:    # n float32 = 4n bytes
    return torch.arange(n, dtype=torch.float32) + i


@pytest.mark.ray
def test_hit_comes_from_the_object_store(ray_up):
    async def main():
        c = DiTCacheClient.connect("c-hit", DiTCacheConfig())
        key = conditioning_key("tiny", "a red fox", "t5")
        assert await c.get(key) is None
        assert await c.put(key, {"emb": tensor(7), "mask": torch.ones(3, dtype=torch.bool)})
        ref = await c.get_ref(key)
        assert isinstance(ref, ray.ObjectRef)            # the actor hands out a reference...
        got = await c.get(key)                           # ...and the value comes from the store
        assert torch.equal(got["emb"], tensor(7)) and got["mask"].dtype == torch.bool
        st = await c.stats()
        assert (st["hits"], st["misses"], st["entries"]) == (2, 1, 1)
        assert st["bytes"] == tensor(7).nbytes + 3 + len("emb") + len("mask")
        no_seed = image_key("tiny", "a red fox", {"steps": 4})
        assert not await c.put(no_seed, b"png") and await c.get(no_seed) is None
        off = DiTCacheClient.connect("c-hit", DiTCacheConfig(cache_images=False))
        k_img = image_key("tiny", "a red fox", {"seed": 3})
        assert not await off.put(k_img, b"png") and await c.get(k_img) is None
        kill_cache("c-hit")
    run(main())


@pytest.mark.ray
@pytest.mark.parametrize("strategy,victim", [("lru", "c"), ("lfu", "a")])
def test_eviction_respects_budget(ray_up, strategy, victim):
    async def main():
        app = f"c-evict-{strategy}"
        c = DiTCacheClient.connect(app, DiTCacheConfig(strategy=strategy, max_bytes=3 * tensor(0).nbytes))
        for i, k in enumerate("abc"):
            assert await c.put(k, tensor(i))
        for k in ("c", "b", "c", "b", "a"):              # least recent: c; fewest hits: a (1 vs 2, 2)
            assert await c.get(k) is not None
        assert not await c.put("huge", tensor(0, 4 * 256))   # over the whole budget: not cached
        assert await c.put("d", tensor(3))
        st = await c.stats()
        assert st["entries"] == 3 and st["bytes"] <= st["max_bytes"] and st["evictions"] == 1
        assert await c.get(victim) is None
        assert torch.equal(await c.get("d"), tensor(3))
        kill_cache(app)
    run(main())


@pytest.mark.ray
def test_ttl_and_invalidation(ray_up):
    async def main():
        c = DiTCacheClient.connect("c-ttl", DiTCacheConfig(strategy="ttl", ttl_s=60))
        await c.put("short", tensor(1), ttl_s=0.3)
        await c.put(conditioning_key("m1", "p", "t5"), tensor(2))
        await c.put(conditioning_key("m1", "q", "t5"), tensor(3))
        await c.put(conditioning_key("m2", "p", "t5"), tensor(4))
        await asyncio.sleep(0.5)
        assert await c.get("short") is None
        assert await c.invalidate(conditioning_key("m1", "q", "t5"))
        assert not await c.invalidate(conditioning_key("m1", "q", "t5"))
        assert await c.invalidate_model("m1") == 1
        assert await c.get(conditioning_key("m1", "p", "t5")) is None
        assert torch.equal(await c.get(conditioning_key("m2", "p", "t5")), tensor(4))
        st = await c.stats()
        assert (st["entries"], st["expirations"], st["invalidations"]) == (1, 1, 2)
        kill_cache("c-ttl")
    run(main())


@pytest.mark.ray
def test_cache_actor_restart_starts_empty_and_recovers(ray_up):
    async def main():
        cfg = DiTCacheConfig()
        c = DiTCacheClient.connect("c-restart", cfg)
        await c.put("k", tensor(5))
        assert torch.equal(await c.get("k"), tensor(5))
        ray.kill(get_or_create_cache("c-restart", cfg), no_restart=False)
        t0 = time.monotonic()
        while (await c.stats() or {}).get("entries") != 0:   # the restarted actor answers, empty
            assert time.monotonic() - t0 < 30
            await asyncio.sleep(0.05)
        assert await c.get("k") is None                  # a miss, not an error
        assert await c.put("k", tensor(6))
        assert torch.equal(await c.get("k"), tensor(6))
        kill_cache("c-restart")
    run(main())


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self, app):
        self.client = DiTCacheClient.connect(app, DiTCacheConfig())

    async def produce(self, key: str, i: int) -> list:
        assert await self.client.put(key, tensor(i, 4096))   # 16 KiB: large enough for the object store
        return [ray.put(tensor(i, 4096))]                     # a sentinel this worker owns


async def owner_is_gone(sentinel) -> bool:
    try:
        await asyncio.wait_for(sentinel, 5)
        return False
    except ray.exceptions.OwnerDiedError:
        return True


@pytest.mark.ray
def test_values_outlive_their_producer(ray_up):
    async def main():
        p = Producer.remote("c-owner")
        [sentinel] = await p.produce.remote("k", 9)
        ray.kill(p)                                      # the replica that put the value dies
        t0 = time.monotonic()
        while not await owner_is_gone(sentinel):         # objects it owns are lost now
            assert time.monotonic() - t0 < 30
            await asyncio.sleep(0.2)
        c = DiTCacheClient.connect("c-owner", DiTCacheConfig())
        got = await c.get("k")                           # but the cached copy belongs to the cache
        assert got is not None and torch.equal(got, tensor(9, 4096))
        kill_cache("c-owner")
    run(main())
