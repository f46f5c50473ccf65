"""The DiT cache: conditioning and finished images shared by every DiT replica of an application.

A named async actor (``omni-dit-cache-{app}``, namespace ``omni_ray``, 0 CPUs, restarted by Ray)
keeps an index ``key -> ObjectRef``; values live in Ray's object store and never pass through
the actor. Objects are owned by the cache actor, so a producer replica that dies loses nothing:
``ray.put(value, _owner=...)`` was removed in Ray 2.56, so ``put`` instead has the actor submit
a tiny copy task (``_adopt``) on the producer's ref; a task's return value is owned by whoever
submitted it, the actor. The copy runs in a worker next to the data, never in the actor.
A restarted cache actor starts empty (its objects died with it); clients just miss.

    cache = DiTCacheClient.connect(app_name, cfg.dit_cache)
    key = conditioning_key("pixart", prompt, "t5")          # or image_key(model, prompt, params)
    value = await cache.get(key)                              # None on a miss or any cache failure
    if value is None:
        value = encode(prompt)
        await cache.put(key, value)                           # False if not cached; never raises

Keys: ``{cond|img}/{sha256 of canonical JSON}/{model}``. ``image_key`` returns None for a request
without a seed (never image-cached); ``get(None)``/``put(None, ...)`` are no-ops. Strategies:
``lru``, ``fifo`` (the oldest put goes first, hits or not), ``lfu`` (least hits, then least
recent) and ``ttl`` (entries expire ``ttl_s`` after the put, the soonest to expire goes first),
all under the byte budget ``max_bytes`` measured by the copy task. ``put(..., ttl_s=...)`` gives
one entry its own lifetime under any strategy. Eviction scans the entries for lfu/ttl (fine for
the ~1e4 entries a cache holds).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import ray

from omni_ray.cluster import named_actor
from omni_ray.config import DiTCacheConfig
from omni_ray.errors import CacheError

log = logging.getLogger(__name__)


def cache_name(app_name: str) -> str:
    return f"omni-dit-cache-{app_name}"


# ----------------------------------------------------------------------------- keys
def _digest(payload: dict) -> str:
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CacheError(f"cache key parts must be plain JSON values: {e}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def conditioning_key(model: str, prompt: str, kind: str, **extra: Any) -> str:
    """Key for a prompt's conditioning (``kind``: e.g. "t5", "clip", "ar_hidden"; extra: layer, ...)."""
    return f"cond/{_digest({'model': model, 'prompt': prompt, 'kind': kind, **extra})}/{model}"


def image_key(model: str, prompt: str, params: dict) -> str | None:
    """Key for a finished image of a fully deterministic request; None without a seed."""
    if params.get("seed") is None:
        return None
    return f"img/{_digest({'model': model, 'prompt': prompt, 'params': params})}/{model}"


def hidden_states_key(model: str, req) -> str:
    """Key of an AR stage's prompt hidden states (``req``: an ARRequest): what they are a function
    of (model, prompt or messages, system prompt, layer)."""
    return conditioning_key(model, req.input_digest(), "hidden_states")


def key_model(key: str) -> str | None:
    parts = key.split("/", 2)
    return parts[2] if len(parts) == 3 and parts[0] in ("cond", "img") else None


def nbytes_of(value: Any) -> int:
    """Bytes a value occupies: tensors/arrays by their buffers, containers summed."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    n = getattr(value, "nbytes", None)          # torch.Tensor, numpy.ndarray
    if isinstance(n, int):
        return n
    if isinstance(value, dict):
        return sum(nbytes_of(k) + nbytes_of(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(nbytes_of(v) for v in value)
    if value is None or isinstance(value, (int, float, bool)):
        return 8
    import pickle
    return len(pickle.dumps(value, protocol=5))


@ray.remote(num_cpus=0, num_returns=2, max_retries=0)
def _adopt(value):
    """Returns (nbytes, value): the copy is owned by the caller (the cache actor)."""
    return nbytes_of(value), value


# ----------------------------------------------------------------------------- the index
@dataclass(slots=True)
class Entry:
    ref: Any
    nbytes: int
    model: str | None
    created: float
    expires: float
    last: int = 0
    hits: int = 0
    meta: dict | None = None       # small metadata kept beside the ref (shape, dtype, source)


class CacheIndex:
    """Keys -> entries under a byte budget; the eviction strategy. Plain Python."""

    def __init__(self, config: DiTCacheConfig, clock=time.monotonic):
        self.cfg, self.clock = config, clock
        self.entries: OrderedDict[str, Entry] = OrderedDict()     # least recently used (fifo: put) first
        self.bytes = 0
        self.tick = 0
        self.counts = dict.fromkeys(("hits", "misses", "puts", "rejected", "evictions", "expirations",
                                     "invalidations"), 0)

    def get(self, key: str) -> Entry | None:
        e = self.entries.get(key)
        if e is not None and e.expires <= self.clock():
            self._drop(key, "expirations")
            e = None
        if e is None:
            self.counts["misses"] += 1
            return None
        self.counts["hits"] += 1
        self.tick += 1
        e.hits, e.last = e.hits + 1, self.tick
        if self.cfg.strategy != "fifo":             # fifo keeps the order of the puts
            self.entries.move_to_end(key)
        return e

    def put(self, key: str, ref: Any, nbytes: int, model: str | None, ttl_s: float | None = None,
            meta: dict | None = None) -> list[str]:
        """Insert (or replace); returns the evicted keys. Raises CacheError if it can never fit."""
        if nbytes > self.cfg.max_bytes:
            self.counts["rejected"] += 1
            raise CacheError(f"value of {nbytes} bytes exceeds the cache budget of {self.cfg.max_bytes}")
        if key in self.entries:
            self._drop(key, None)
        now = self.clock()
        ttl = ttl_s if ttl_s is not None else (self.cfg.ttl_s if self.cfg.strategy == "ttl" else float("inf"))
        self.tick += 1
        self.entries[key] = Entry(ref, nbytes, model, now, now + ttl, last=self.tick, meta=meta)
        self.bytes += nbytes
        self.counts["puts"] += 1
        self.expire()
        evicted = []
        while self.bytes > self.cfg.max_bytes:
            victim = self._victim(exclude=key)
            self._drop(victim, "evictions")
            evicted.append(victim)
        return evicted

    def _victim(self, exclude: str) -> str:
        keys = (k for k in self.entries if k != exclude)
        if self.cfg.strategy in ("lru", "fifo"):
            return next(keys)
        if self.cfg.strategy == "lfu":
            return min(keys, key=lambda k: (self.entries[k].hits, self.entries[k].last))
        return min(keys, key=lambda k: (self.entries[k].expires, self.entries[k].last))

    def expire(self) -> int:
        now = self.clock()
        dead = [k for k, e in self.entries.items() if e.expires <= now]
        for k in dead:
            self._drop(k, "expirations")
        return len(dead)

    def invalidate(self, key: str) -> bool:
        if key not in self.entries:
            return False
        self._drop(key, "invalidations")
        return True

    def invalidate_model(self, model: str) -> int:
        keys = [k for k, e in self.entries.items() if e.model == model]
        for k in keys:
            self._drop(k, "invalidations")
        return len(keys)

    def clear(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        self.bytes = 0
        return n

    def _drop(self, key: str, counter: str | None) -> None:
        self.bytes -= self.entries.pop(key).nbytes
        if counter:
            self.counts[counter] += 1

    def stats(self) -> dict:
        looked = self.counts["hits"] + self.counts["misses"]
        return {**self.counts, "hit_rate": self.counts["hits"] / looked if looked else 0.0, "bytes": self.bytes,
                "max_bytes": self.cfg.max_bytes, "entries": len(self.entries), "strategy": self.cfg.strategy,
                "utilization": self.bytes / self.cfg.max_bytes if self.cfg.max_bytes else 0.0}


# ----------------------------------------------------------------------------- the actor
class DiTCache:
    def __init__(self, app_name: str, config: DiTCacheConfig):
        self.app_name = app_name
        self.index = CacheIndex(config)
        self.copies = asyncio.Semaphore(8)        # bounds concurrent copy tasks

    async def put(self, key: str, refs: list, model: str | None = None, ttl_s: float | None = None,
                  nbytes_hint: int | None = None, meta: dict | None = None) -> bool:
        """Adopt ``refs[0]`` (a producer's ray.put) under ``key``. The ref comes wrapped in a list
        so Ray passes the reference, not the value."""
        if nbytes_hint is not None and nbytes_hint > self.index.cfg.max_bytes:
            self.index.counts["rejected"] += 1
            return False
        async with self.copies:
            nbytes_ref, ref = _adopt.remote(refs[0])
            try:
                nbytes = await nbytes_ref
            except ray.exceptions.RayError as e:     # the producer's object was gone already
                log.warning("dit cache: could not adopt %s: %s", key, e)
                return False
        try:
            self.index.put(key, ref, nbytes, model or key_model(key), ttl_s, meta)
        except CacheError:
            return False
        return True

    async def get(self, key: str) -> list | None:
        """``[ref, meta]`` on a hit (the caller fetches from the object store), None on a miss."""
        e = self.index.get(key)
        return None if e is None else [e.ref, e.meta]

    async def contains(self, key: str) -> bool:
        e = self.index.entries.get(key)
        return e is not None and e.expires > self.index.clock()

    async def invalidate(self, key: str) -> bool:
        return self.index.invalidate(key)

    async def invalidate_model(self, model: str) -> int:
        return self.index.invalidate_model(model)

    async def clear(self) -> int:
        return self.index.clear()

    async def stats(self) -> dict:
        self.index.expire()
        return self.index.stats()

    async def keys(self) -> list[str]:
        return list(self.index.entries)


def get_or_create_cache(app_name: str, config: DiTCacheConfig):
    return named_actor.get_or_create(DiTCache, cache_name(app_name), app_name, config,
                                     detached=config.detached, max_concurrency=1000)


def kill_cache(app_name: str) -> bool:
    """Kill the app's DiT cache actor (and its video store's, ``/v1/videos``, if one was made)."""
    named_actor.kill(cache_name(f"{app_name}-videos"))
    return named_actor.kill(cache_name(app_name))


# ----------------------------------------------------------------------------- the client
class DiTCacheClient:
    """Used inside DiT replicas (and the ingress). Never raises on cache trouble: ``get`` returns
    None and ``put`` False, and the actor is re-resolved on the next call."""

    def __init__(self, app_name: str, config: DiTCacheConfig | None = None):
        self.app_name = app_name
        self.cfg = config or DiTCacheConfig()
        self.handle = None
        self.errors = 0

    @classmethod
    def connect(cls, app_name: str, config: DiTCacheConfig | None = None) -> "DiTCacheClient":
        client = cls(app_name, config)
        if client.cfg.enabled and ray.is_initialized():
            client.handle = get_or_create_cache(app_name, client.cfg)
        return client

    def enabled_for(self, key: str | None) -> bool:
        if key is None or not self.cfg.enabled:
            return False
        if key.startswith("img/"):
            return self.cfg.cache_images
        if key.startswith("cond/"):
            return self.cfg.cache_conditioning
        return True

    async def get(self, key: str | None) -> Any | None:
        ref = await self.get_ref(key)
        if ref is None:
            return None
        try:
            return await asyncio.wait_for(ref, self.cfg.call_timeout_s)
        except Exception as e:                       # object lost (cache actor restarted, node died)
            self._failed("fetch", e)
            await self.invalidate(key)
            return None

    async def get_ref(self, key: str | None):
        """The ObjectRef on a hit (to hand to another stage without fetching), else None."""
        if not self.enabled_for(key):
            return None
        reply = await self._call("get", key)
        return reply[0] if reply else None

    async def get_entry(self, key: str | None):
        """(ObjectRef, meta) on a hit, without fetching the value; None on a miss."""
        if not self.enabled_for(key):
            return None
        reply = await self._call("get", key)
        return (reply[0], reply[1] if len(reply) > 1 else None) if reply else None

    async def put_ref(self, key: str | None, ref, *, meta: dict | None = None, model: str | None = None,
                      ttl_s: float | None = None, nbytes: int | None = None) -> bool:
        """Index a value another process already put in the object store (the cache actor adopts a
        copy, so the entry outlives its producer); ``meta`` comes back with every hit."""
        if not self.enabled_for(key):
            return False
        return bool(await self._call("put", key, [ref], model, ttl_s, nbytes, meta))

    async def put(self, key: str | None, value: Any, *, model: str | None = None, ttl_s: float | None = None) -> bool:
        if not self.enabled_for(key):
            return False
        try:
            ref = ray.put(value)
        except Exception as e:
            self._failed("put", e)
            return False
        return bool(await self._call("put", key, [ref], model, ttl_s, nbytes_of(value)))

    async def invalidate(self, key: str) -> bool:
        return bool(await self._call("invalidate", key))

    async def invalidate_model(self, model: str) -> int:
        return await self._call("invalidate_model", model) or 0

    async def clear(self) -> int:
        return await self._call("clear") or 0

    async def stats(self) -> dict | None:
        return await self._call("stats")

    async def _call(self, method: str, *args):
        try:
            if self.handle is None:
                self.handle = await asyncio.to_thread(get_or_create_cache, self.app_name, self.cfg)
            return await asyncio.wait_for(getattr(self.handle, method).remote(*args), self.cfg.call_timeout_s)
        except Exception as e:
            self._failed(method, e)
            return None

    def _failed(self, what: str, err: Exception) -> None:
        self.errors += 1
        self.handle = None
        log.debug("dit cache %s failed (%s: %s)", what, type(err).__name__, err)
