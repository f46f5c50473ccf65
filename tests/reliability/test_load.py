"""500 mixed requests from 64 concurrent clients against the guarded app (every stage, every kind
of request): each is answered exactly once, with 200 or 429, and afterwards every engine, the
scheduler and the DiT cache are back at their idle values."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import httpx
import pytest
import ray

from tests.reliability.conftest import API_KEY, replica_ids, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REQUESTS = 500
CLIENTS = 64
KEYED = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["a red fox", "a lighthouse at dusk", "two cats", "a tiny robot"]
IMG = {"size": "32x32", "num_inference_steps": 2}


def mix(i: int) -> tuple[str, str, dict]:
    """(kind, path, body) of request ``i``: chat / completions streamed and not, images (seeded
    ones hit the image cache), and every pipeline."""
    p = PROMPTS[i % len(PROMPTS)]
    chat = {"messages": [{"role": "user", "content": f"{p} {i}"}], "max_tokens": 6, "ignore_eos": True}
    kinds = [
        ("chat", "/v1/chat/completions", chat),
        ("chat-stream", "/v1/chat/completions", {**chat, "stream": True,
                                                 "stream_options": {"include_usage": True}}),
        ("completion", "/v1/completions", {"prompt": f"{p} {i}", "max_tokens": 6, "n": 2, "ignore_eos": True}),
        ("completion-stream", "/v1/completions", {"prompt": p, "max_tokens": 6, "stream": True, "ignore_eos": True}),
        ("image", "/v1/images/generations", {"prompt": p, **IMG}),
        ("image-seeded", "/v1/images/generations", {"prompt": p, "seed": i % 2, **IMG}),
        ("text2image", "/v1/pipelines/text2image", {"prompt": p, **IMG}),
        ("llm-encoder", "/v1/pipelines/text2image-llm-encoder", {"prompt": p, **IMG}),
        ("chat-pipeline-stream", "/v1/pipelines/chat", {"prompt": p, "max_tokens": 6, "stream": True}),
    ]
    return kinds[i % len(kinds)]


def check_ok(kind: str, body: dict, r: httpx.Response) -> str | None:
    """None if a 200 response is complete and well-formed, else what is wrong."""
    if not body.get("stream"):
        out = r.json()
        if kind.startswith("chat"):
            return None if out["choices"][0]["message"]["content"] is not None else "no content"
        if kind == "completion":
            return None if len(out["choices"]) == 2 else f"{len(out['choices'])} choices"
        n = len(out.get("data") or out.get("images") or [])
        return None if n == 1 else f"{n} images"
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    if events.count("[DONE]") != 1 or events[-1] != "[DONE]":
        return f"stream ends {events[-2:]}"
    parsed = [json.loads(e) for e in events[:-1]]
    if any("error" in e for e in parsed):
        return f"error event {[e for e in parsed if 'error' in e][0]}"
    if kind == "chat-pipeline-stream":
        return None if sum(e["type"] == "result" for e in parsed) == 1 else "result events != 1"
    finishes = [c["finish_reason"] for e in parsed for c in e["choices"] if c.get("finish_reason")]
    return None if finishes == ["length"] else f"finish reasons {finishes}"


async def run_load(url: str) -> list[tuple[str, int, str | None, float]]:
    sem = asyncio.Semaphore(CLIENTS)

    async def one(c: httpx.AsyncClient, i: int):
        kind, path, body = mix(i)
        async with sem:
            t0 = time.perf_counter()
            r = await c.post(path, json=body)
            dt = time.perf_counter() - t0
        if r.status_code == 200:
            return kind, 200, check_ok(kind, body, r), dt
        if r.status_code == 429:
            ok = r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
            return kind, 429, None if ok else f"bad 429 {r.text[:200]}", dt
        return kind, r.status_code, r.text[:300], dt

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, headers=KEYED, timeout=300, limits=limits) as c:
        order = list(range(REQUESTS))
        random.Random(0).shuffle(order)
        return await asyncio.gather(*(one(c, i) for i in order))


def scheduler_status(app: str) -> dict:
    from omni_ray.cluster.admission.actor import scheduler_name
    from omni_ray.cluster.named_actor import NAMESPACE

    return ray.get(ray.get_actor(scheduler_name(app), namespace=NAMESPACE).get_status.remote(), timeout=30)


def cache_stats(app: str) -> dict:
    from omni_ray.cluster.dit_cache import cache_name
    from omni_ray.cluster.named_actor import NAMESPACE

    return ray.get(ray.get_actor(cache_name(app), namespace=NAMESPACE).stats.remote(), timeout=30)


def idle_state(guard) -> dict:
    """What must be the same before and after the load."""
    s = guard.stats(KEYED)
    llm = s["llm"]
    sched = scheduler_status(guard.name)
    cache = cache_stats(guard.name)
    return {
        "kv_free_blocks": (llm["num_free_blocks"], llm["num_blocks"]),
        "llm_requests": llm["num_running"] + llm["num_waiting"] + llm["num_streams"],
        "dit_slots": {k: s[k]["active_requests"] + s[k]["waiting_requests"] + s[k]["num_streams"]
                      for k in ("image", "image-llm")},
        "scheduler": (sched["live"], sched["queued"], {n: st["running"] for n, st in sched["stages"].items()}),
        "cache": (cache["entries"], cache["bytes"]),
    }


def test_500_mixed_requests_at_64_clients(guard):
    # warm-up: every kind once, so the image cache holds its (seeded) entries and every stage is loaded
    warm = asyncio.run(_warm(guard.url))
    assert all(code == 200 for code in warm), warm
    replicas = replica_ids(guard.name)
    before = idle_state(guard)
    assert before["llm_requests"] == 0 and before["kv_free_blocks"][0] == before["kv_free_blocks"][1]
    counts0 = scheduler_status(guard.name)["processed"]

    t0 = time.perf_counter()
    results = asyncio.run(run_load(guard.url))
    wall = time.perf_counter() - t0

    assert len(results) == REQUESTS
    bad = [(k, code, why) for k, code, why, _ in results if code not in (200, 429) or why]
    assert not bad, bad[:5]
    codes = Counter(code for _, code, _, _ in results)
    lat = sorted(dt for _, code, _, dt in results if code == 200)
    by_kind = Counter((k, code) for k, code, _, _ in results)
    print(f"\n{REQUESTS} requests, {CLIENTS} clients: {dict(codes)} in {wall:.1f}s "
          f"({REQUESTS / wall:.1f} req/s); p50 {lat[len(lat) // 2]:.2f}s p99 {lat[int(len(lat) * 0.99)]:.2f}s\n"
          f"by kind: {dict(sorted(by_kind.items()))}")
    assert codes[200] > 0

    # exactly once, seen from the scheduler: one outcome per request, none failed or cancelled
    def settled():
        c = scheduler_status(guard.name)["processed"]
        d = {k: c[k] - counts0[k] for k in c}
        return d if d["completed"] + d["rejected"] + d["failed"] + d["cancelled"] >= REQUESTS else None

    delta = wait_until(settled, 60, "scheduler outcomes of every request")
    assert delta["completed"] == codes[200] and delta["rejected"] == codes[429], delta
    assert delta["failed"] == delta["cancelled"] == 0, delta

    t1 = time.perf_counter()
    after = wait_until(lambda: (st := idle_state(guard)) == before and st, 60, "idle values after the load")
    print(f"idle again {time.perf_counter() - t1:.1f}s after the last response: {after}")
    assert replica_ids(guard.name) == replicas, "a replica restarted under load"


async def _warm(url: str) -> list[int]:
    """Every (kind, prompt) once: afterwards the DiT cache holds every entry the load can add
    (seeded images, hidden states of each prompt), so its idle value is known."""
    sem = asyncio.Semaphore(8)

    async def one(c: httpx.AsyncClient, i: int) -> int:
        _, path, body = mix(i)
        async with sem:
            return (await c.post(path, json=body)).status_code

    async with httpx.AsyncClient(base_url=url, headers=KEYED, timeout=300) as c:
        return await asyncio.gather(*(one(c, i) for i in range(9 * len(PROMPTS))))
