"""OmniScheduler through its client: admissions per second and the latency it adds per request.

    python benchmarks/bench_scheduler.py              # CPU, local Ray (num_cpus=2)
    python benchmarks/bench_scheduler.py --quick

Scenarios (each on a fresh scheduler actor):
  * uncontended: C coroutines loop admit -> finished(); stage capacity >= C, so admission is
    one batched round trip (throughput = admissions/s).
  * contended:   the same with capacity C/8: requests queue in the actor and are granted through
    the client's long poll as others finish (priorities mixed high/normal/low).
  * latency:     one coroutine, admit -> finished() in sequence: the time a request spends in the
    scheduler (finished() only buffers); "acked" also waits until the finish reached the actor.
    The floor is one empty async actor call from asyncio (baseline row).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import table, write_result  # noqa: E402
from omni_ray.cluster.admission import SchedulerClient, kill_scheduler  # noqa: E402
from omni_ray.cluster.admission.records import percentiles  # noqa: E402
from omni_ray.config import OmniSchedulerConfig  # noqa: E402

PRIOS = ("high", "normal", "low")


@ray.remote(num_cpus=0)
class Echo:
    async def f(self, x):
        return x


def ms(p: dict) -> dict:
    return {k: v * 1e3 for k, v in p.items()}


async def throughput(name: str, clients: int, conc: int, total: int, capacity: int) -> dict:
    cfg = OmniSchedulerConfig(default_stage_capacity=capacity, max_queue_size=total)
    cs = [SchedulerClient.connect(name, cfg) for _ in range(clients)]
    await cs[0].get_status()                                   # actor up before timing
    per = total // (clients * conc)
    lat: list[float] = []

    async def worker(c: SchedulerClient, w: int):
        for i in range(per):
            rid = f"{c.client_id}-{w}-{i}"
            t0 = time.perf_counter()
            await c.admit(rid, "bench", ["s"], priority=PRIOS[i % 3])
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0)                             # "run" the request
            c.finished(rid)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(c, w) for c in cs for w in range(conc)])
    for c in cs:
        await c.flush()
    dt = time.perf_counter() - t0
    status = await cs[0].get_status()
    calls = sum(c.stats["calls"] for c in cs)
    for c in cs:
        await c.close()
    kill_scheduler(name)
    n = per * clients * conc
    assert status["processed"]["completed"] == n, status["processed"]
    return {"scenario": name, "clients": clients, "concurrency": clients * conc, "capacity": capacity,
            "requests": n, "seconds": dt, "admissions_per_s": n / dt, "actor_calls": calls,
            "events_per_call": 2 * n / max(1, calls), **{f"admit_{k}_ms": v for k, v in ms(percentiles(lat)).items()}}


async def latency(n: int) -> list[dict]:
    echo = Echo.remote()
    await echo.f.remote(0)
    base = []
    for i in range(n):
        t0 = time.perf_counter()
        await echo.f.remote(i)
        base.append(time.perf_counter() - t0)
    c = SchedulerClient.connect("bench-latency", OmniSchedulerConfig())
    await c.get_status()
    rows = [{"scenario": "baseline: empty async actor call", "requests": n, **ms(percentiles(base))}]
    for acked in (False, True):
        lat = []
        for i in range(n):
            rid = f"l{int(acked)}-{i}"
            t0 = time.perf_counter()
            await c.admit(rid, "bench", ["s"])
            c.finished(rid)
            if acked:
                await c.flush()
            lat.append(time.perf_counter() - t0)
        rows.append({"scenario": "admit + finish" + (" (acked)" if acked else ""), "requests": n,
                     **ms(percentiles(lat))})
    await c.close()
    kill_scheduler("bench-latency")
    return rows


async def main_async(args) -> dict:
    conc, total = (64, 4000) if args.quick else (args.concurrency, args.requests)
    tp = [await throughput("bench-uncontended", args.clients, conc, total, capacity=args.clients * conc),
          await throughput("bench-contended", args.clients, conc, total, capacity=max(1, args.clients * conc // 8))]
    lat = await latency(300 if args.quick else args.latency_requests)
    return {"throughput": tp, "latency_ms": lat}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=2, help="ingress replicas simulated (one client each)")
    ap.add_argument("--concurrency", type=int, default=128, help="coroutines per client")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--latency-requests", type=int, default=1000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        res = asyncio.run(main_async(args))
    finally:
        ray.shutdown()
    print(table(res["throughput"], ["scenario", "concurrency", "capacity", "requests", "admissions_per_s",
                                    "events_per_call", "admit_p50_ms", "admit_p99_ms"]))
    print()
    print(table(res["latency_ms"], ["scenario", "requests", "p50", "p90", "p99"]))
    path = write_result("scheduler_cpu.json", {"args": vars(args), **res})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
