"""OmniScheduler: the fair queue and state machine (plain Python), then the actor and its client
on a local Ray cluster (admission under a full queue, cancellation, monitoring, restarts)."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from omni_ray.cluster.admission import (
    FairQueue,
    SchedulerClient,
    SchedulerCore,
    get_or_create_scheduler,
    kill_scheduler,
)
from omni_ray.cluster.dit_cache import DiTCacheClient, kill_cache
from omni_ray.config import DiTCacheConfig, OmniSchedulerConfig
from omni_ray.errors import InvalidRequestError, QueueFullError, RequestCancelledError

W = {"high": 4.0, "normal": 2.0, "low": 1.0}


# ----------------------------------------------------------------------------- fair queue
def test_priority_queue_shares_follow_weights():
    q = FairQueue("priority", W)
    for i in range(8):                                  # low arrives first: order is not arrival
        q.push(f"l{i}", "low")
    for i in range(8):
        q.push(f"n{i}", "normal")
        q.push(f"h{i}", "high")
    order = [q.pop() for _ in range(24)]
    assert q.pop() is None and len(q) == 0
    first7 = [r[0] for r in order[:7]]                  # weights 4:2:1 -> 4 high, 2 normal, 1 low
    assert (first7.count("h"), first7.count("n"), first7.count("l")) == (4, 2, 1)
    pos = {c: sum(i for i, r in enumerate(order) if r[0] == c) / 8 for c in "hnl"}
    assert pos["h"] < pos["n"] < pos["l"]
    assert [r for r in order if r[0] == "l"] == [f"l{i}" for i in range(8)]   # FIFO within a class


def test_low_priority_is_not_starved():
    q = FairQueue("priority", W)
    q.push("low", "low")
    for i in range(4):
        q.push(f"h{i}", "high")
    popped, n = [], 4
    while "low" not in popped:                          # high stays backlogged the whole time
        popped.append(q.pop())
        q.push(f"h{n}", "high")
        n += 1
        assert len(popped) <= 10
    assert popped.index("low") <= W["high"] / W["low"] + 1


def test_fifo_queue_and_removal():
    q = FairQueue("fifo", W)
    for rid, p in [("a", "low"), ("b", "high"), ("c", "normal"), ("d", "high")]:
        q.push(rid, p)
    assert q.remove("c") and not q.remove("c") and len(q) == 3 and "c" not in q
    assert q.depth() == {"high": 2, "normal": 0, "low": 1}
    assert [q.pop() for _ in range(3)] == ["a", "b", "d"]


# ----------------------------------------------------------------------------- state machine
class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def core(**kw):
    clock = Clock()
    return SchedulerCore(OmniSchedulerConfig(**kw), clock=clock), clock


def test_core_tracks_states_and_timestamps():
    c, clock = core(default_stage_capacity=1)
    c.handle("A", [("admit", "r1", "t2i", ("llm", "dit"), "normal", clock.t)])
    assert c.take("A")["granted"] == [("r1", "llm")]
    for ev in [("start", "r1", "llm"), ("stage_done", "r1", "llm"), ("enter", "r1", "dit"),
               ("start", "r1", "dit"), ("stage_done", "r1", "dit")]:
        clock.t += 1.0
        c.handle("A", [(*ev, clock.t)])
    clock.t += 1.0
    c.handle("A", [("finish", "r1", "completed", None, clock.t)])
    r = c.request("r1")
    assert r["state"] == "completed"
    assert [(s, st) for _, s, st in r["history"]] == [("queued", "llm"), ("running", "llm"), ("queued", "dit"),
                                                       ("running", "dit"), ("completed", "dit")]
    ts = [t for t, _, _ in r["history"]]
    assert ts == sorted(ts) and r["timestamps"]["finished"] - r["timestamps"]["queued"] == 6.0
    assert r["stage_timestamps"]["llm"]["finished"] - r["stage_timestamps"]["llm"]["started"] == 1.0
    st = c.status()
    assert st["processed"]["completed"] == 1 and st["stages"]["dit"]["running"] == 0 and c.live == {}


def test_core_counts_client_errors_apart_from_failures():
    """A request that ends with a 4xx (bad input found by a stage) is a client_error: counted on its
    own, not as failed, and its slot is freed like any other end."""
    c, clock = core(default_stage_capacity=2)
    for rid in ("bad", "broken", "good"):
        c.handle("A", [("admit", rid, "chat", ("llm",), "normal", clock.t)])
    c.handle("A", [("finish", "bad", "client_error", "prompt is too long", clock.t),
                   ("finish", "broken", "failed", "engine step failed", clock.t)])
    st = c.status()
    assert {k: st["processed"][k] for k in ("client_error", "failed", "completed")} == \
        {"client_error": 1, "failed": 1, "completed": 0}
    assert c.request("bad")["state"] == "client_error" and c.request("bad")["error"] == "prompt is too long"
    assert st["stages"]["llm"]["running"] == 1 and c.take("A")["granted"][-1] == ("good", "llm")


def test_core_bounded_queue_and_priority_grants():
    c, clock = core(default_stage_capacity=1, max_queue_size=3)
    c.handle("A", [("admit", "hold", "p", ("s",), "normal", clock.t)])
    c.handle("A", [("admit", f"r{i}", "p", ("s",), p, clock.t) for i, p in enumerate(["low", "normal", "high"])])
    c.handle("A", [("admit", "r3", "p", ("s",), "high", clock.t)])
    out = c.take("A")
    assert out["granted"] == [("hold", "s")]
    assert [r[:2] for r in out["rejected"]] == [("r3", "queue_full")]
    assert c.queue_depth() == {"s": 3} and c.status()["processed"]["rejected"] == 1
    grants = []
    for rid in ["hold", "r2", "r1", "r0"]:
        c.handle("A", [("finish", rid, "completed", None, clock.t)])
        grants += [g[0] for g in c.take("A")["granted"]]
    assert grants == ["r2", "r1", "r0"]                 # high, normal, low


def test_core_cancel_queued_and_running():
    c, clock = core(default_stage_capacity=1)
    c.handle("A", [("admit", "run", "p", ("s",), "normal", clock.t), ("admit", "wait", "p", ("s",), "normal", clock.t)])
    c.take("A")
    assert c.cancel("wait") and c.request("wait")["state"] == "cancelled"      # queued: ends at once
    assert c.cancel("run") and c.request("run")["state"] == "running"          # running: owner decides
    assert c.take("A")["cancelled"] == ["wait", "run"]
    c.handle("A", [("finish", "run", "cancelled", None, clock.t)])
    assert c.request("run")["state"] == "cancelled" and not c.cancel("run") and not c.cancel("nope")


def test_core_health_metrics_and_reaping():
    c, clock = core(default_stage_capacity=1, max_queue_size=10, stuck_after_s=60, owner_timeout_s=30)
    for i in range(10):                                 # end-to-end latencies 1..10 s
        c.handle("A", [("admit", f"r{i}", "p", ("s",), "normal", clock.t - (i + 1))])
        c.handle("A", [("finish", f"r{i}", "completed", None, clock.t)])
    m = c.metrics_summary()
    assert (m["latency_s"]["p50"], m["latency_s"]["p90"], m["latency_s"]["p99"]) == (5.0, 9.0, 10.0)
    assert m["throughput_rps"] > 0 and m["queue_utilization"] == 0.0
    assert c.health()["healthy"]
    c.handle("A", [("admit", "slow", "p", ("s",), "normal", clock.t)] +
             [("admit", f"q{i}", "p", ("s",), "normal", clock.t) for i in range(9)])
    c.set_capacity("other", "rep-1", 0)
    clock.t += 61
    h = c.health()
    issues = " | ".join(h["issues"])
    assert not h["healthy"] and "queue near full" in issues and "'other' has no capacity" in issues
    assert h["stuck"] == ["slow"]
    clock.t += 30                                       # client A silent for 91 s > owner_timeout_s
    assert c.reap() == 10 and c.request("slow")["state"] == "failed" and c.live == {}


def test_core_replayed_batches_are_idempotent():
    c, clock = core(default_stage_capacity=4)
    admit = ("admit", "r1", "p", ("s", "t"), "normal", clock.t)
    c.handle("A", [admit])
    c.take("A")                                         # the reply is lost: the client replays
    c.handle("A", [admit])
    assert c.take("A")["granted"] == [("r1", "s")]      # the grant comes again, nothing doubles
    for _ in range(2):
        c.handle("A", [("enter", "r1", "t", clock.t)])
    assert c.take("A")["granted"] == [("r1", "t"), ("r1", "t")]
    assert (c.status()["stages"]["s"]["running"], c.status()["stages"]["t"]["running"]) == (0, 1)
    c.handle("A", [("admit", "r2", "p", ("s",), "low", clock.t)])
    c.cancel("r2")
    c.take("A")                                         # the cancel notice is lost too
    c.handle("A", [("resync", ["r1", "r2"])])
    assert c.take("A")["cancelled"] == ["r2"]
    for _ in range(2):
        c.handle("A", [("finish", "r1", "completed", None, clock.t)])
    c.handle("B", [("admit", "r2", "p", ("s",), "low", clock.t)])      # another client's id clash
    assert [r[:2] for r in c.take("B")["rejected"]] == [("r2", "invalid")]
    c.handle("A", [("resync", [])])                     # A no longer holds r2: dropped
    assert c.request("r2")["state"] == "failed" and c.status()["processed"]["completed"] == 1


def test_core_capacity_reports_gate_admission():
    c, clock = core(default_stage_capacity=5)
    c.set_capacity("s", "rep-1", 1)                     # replicas reported: the default no longer applies
    c.handle("A", [("admit", f"r{i}", "p", ("s",), "normal", clock.t) for i in range(3)])
    assert len(c.take("A")["granted"]) == 1
    c.set_capacity("s", "rep-2", 2)
    assert len(c.take("A")["granted"]) == 2 and c.status()["stages"]["s"]["capacity"] == 3


def test_core_lends_free_slots_and_takes_them_back_when_a_queue_forms():
    c, clock = core(default_stage_capacity=10, admission_lease=8)
    c.handle("A", [("admit", "a0", "p", ("s",), "normal", clock.t)])
    out = c.take("A")
    assert out["granted"] == [("a0", "s")] and out["leased"] == [("s", 4)]      # half of the 9 free
    assert c.take("B")["leased"] == []                  # B never admitted to s: nothing lent
    c.handle("B", [("admit", "b0", "p", ("s",), "normal", clock.t)])
    assert c.take("B")["leased"] == [("s", 2)]          # (10 - 2 running - 4 lent) // 2
    lease_admit = ("lease_admit", "a1", "p", ("s",), "high", clock.t)
    c.handle("A", [lease_admit, lease_admit])           # a replayed report counts once
    st = c.status()["stages"]["s"]
    assert (st["running"], st["leased"]) == (3, 5) and c.request("a1")["state"] == "running"
    assert c.status()["processed"]["admitted"] == 3
    # fill the stage: 3 running + 5 lent + 2 more = 10, the next one queues
    c.handle("C", [("admit", f"c{i}", "p", ("s",), "normal", clock.t) for i in range(3)])
    out = c.take("C")
    assert [g[0] for g in out["granted"]] == ["c0", "c1"] and out["leased"] == []
    assert c.take("A")["revoked"] == ["s"] and c.take("B")["revoked"] == ["s"]
    assert c.take("A")["leased"] == []                  # nothing lent while a queue stands
    c.handle("A", [("lease_admit", "a2", "p", ("s",), "normal", clock.t),     # used before it heard
                   ("lease_return", "s", 2, clock.t)])
    assert c.take("C")["granted"] == [("c2", "s")] and c.status()["stages"]["s"]["leased"] == 2
    c.handle("B", [("resync", ["b0"])])                 # B starts over: its lease is dropped
    assert c.status()["stages"]["s"]["leased"] == 0
    for rid in ("a0", "a1", "a2", "b0", "c0", "c1", "c2"):
        c.handle("A" if rid[0] == "a" else rid[0].upper(), [("finish", rid, "completed", None, clock.t)])
    assert c.take("A")["leased"] == [("s", 5)] and c.status()["stages"]["s"]["running"] == 0
    clock.t += 1000                                     # A goes silent: reaped, its lease with it
    c.reap()
    assert c.status()["stages"]["s"]["leased"] == 0


def test_a_lease_admission_under_another_clients_id_does_not_leak_the_lent_slot():
    """Request ids should be unique; when two ingress replicas still send one id (a client's own
    X-Request-Id), the second's lease admission uses its lent slot all the same (no slot is left
    counted as lent forever) and is counted as an id conflict, not taken for a replay."""
    c, clock = core(default_stage_capacity=10, admission_lease=8)
    for client in ("A", "B"):
        c.handle(client, [("admit", f"{client}0", "p", ("s",), "normal", clock.t)])
        c.take(client)
    lent = c.status()["stages"]["s"]["leased"]
    c.handle("A", [("lease_admit", "same-id", "p", ("s",), "normal", clock.t)])
    c.handle("B", [("lease_admit", "same-id", "p", ("s",), "normal", clock.t)])
    c.handle("B", [("lease_admit", "same-id", "p", ("s",), "normal", clock.t)])   # (a resend looks the same)
    st = c.status()
    assert st["stages"]["s"]["leased"] == lent - 3 and st["processed"]["id_conflicts"] == 2
    assert c.request("same-id")["state"] == "running"            # A's request, tracked


def test_core_without_leases_asks_every_time():
    c, clock = core(default_stage_capacity=10, admission_lease=0)
    c.handle("A", [("admit", "a0", "p", ("s",), "normal", clock.t)])
    assert c.take("A")["leased"] == [] and c.status()["stages"]["s"]["leased"] == 0


# ----------------------------------------------------------------------------- on Ray
def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def until(pred, timeout=20.0):
    t0 = time.monotonic()
    while not await pred():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.ray
def test_full_queue_priorities_and_429(ray_up):
    async def main():
        cfg = OmniSchedulerConfig(default_stage_capacity=1, max_queue_size=30, retry_after_s=2.5)
        c = SchedulerClient.connect("t-prio", cfg)
        await c.admit("blocker", "p", ["s"])
        order: list[str] = []

        async def one(rid, prio):
            await c.admit(rid, "p", ["s"], priority=prio)
            order.append(rid)
            await asyncio.sleep(0.001)
            c.finished(rid)

        tasks = [asyncio.create_task(one(f"{p[0]}{i}", p)) for p in ("low", "normal", "high") for i in range(10)]
        await until(lambda: _depth(c, 30))
        with pytest.raises(QueueFullError) as err:
            await c.admit("extra", "p", ["s"], priority="high")
        assert err.value.http_status == 429 and err.value.retry_after == 2.5
        c.finished("blocker")
        await asyncio.gather(*tasks)
        await c.flush()
        assert len(order) == 30                          # every low finished too
        pos = {k: sum(i for i, r in enumerate(order) if r[0] == k) / 10 for k in "hnl"}
        assert pos["h"] < pos["n"] < pos["l"]
        assert max(order.index(f"h{i}") for i in range(10)) < max(order.index(f"l{i}") for i in range(10))
        st = await c.get_status()
        assert st["processed"]["completed"] == 31 and st["processed"]["rejected"] == 1
        await c.close()
    run(main())


async def _depth(c, n):
    return (await c.get_queue_depth()).get("s") == n


@pytest.mark.ray
def test_leased_admissions_skip_the_round_trip_and_stay_exact(ray_up):
    """After its first admission a client admits on lent slots without calling the actor; the
    actor still sees every request; when another client fills the stage and must queue, the
    lease comes back (from an idle holder too, at once) and the queued requests run."""
    async def main():
        cfg = OmniSchedulerConfig(default_stage_capacity=8, admission_lease=2)
        a, b = SchedulerClient.connect("t-lease", cfg), SchedulerClient.connect("t-lease", cfg)
        await a.admit("a0", "p", ["s"])
        await a.flush()
        calls = a.stats["calls"]
        for rid in ("a1", "a2"):                         # on the lease: no call waited for
            await asyncio.wait_for(a.admit(rid, "p", ["s"]), 0.05)
        assert a.stats["leased"] == 2 and a.stats["calls"] == calls
        await a.flush()
        st = (await a.get_status())["stages"]["s"]
        assert st["running"] == 3 and (await a.get_request("a2"))["state"] == "running"
        assert st["leased"] <= 2                         # topped up again, within the lease size
        for rid in ("a0", "a1", "a2"):                   # a goes idle, still holding its lease
            a.finished(rid)
        await a.flush()
        await until(lambda: _leased(a, 2))
        await asyncio.sleep(1.5)                         # past a's last long poll with live requests
        for i in range(8):                               # b needs every slot: a's lease must come back
            asyncio.create_task(b.admit(f"b{i}", "p", ["s"]))
        await until(lambda: _all_running(b, 8), timeout=10)      # well before a would be reaped (30 s)
        assert (await b.get_status())["stages"]["s"]["leased"] == 0
        for i in range(8):
            b.finished(f"b{i}")
        await b.flush()
        await a.flush()
        st = await b.get_status()
        assert st["processed"]["completed"] == 11 and st["stages"]["s"]["running"] == 0
        await a.close()
        await b.close()
    run(main())


async def _leased(c, n):
    return (await c.get_status())["stages"]["s"]["leased"] == n


async def _all_running(c, n):
    return sum(t.holding for t in c._tickets.values()) == n


@pytest.mark.ray
def test_cancellation_reaches_the_owner(ray_up):
    async def main():
        cfg = OmniSchedulerConfig(default_stage_capacity=1)
        owner, other = SchedulerClient.connect("t-cancel", cfg), SchedulerClient.connect("t-cancel", cfg)
        seen = []
        owner.on_cancel(seen.append)
        ticket = await owner.admit("r1", "p", ["llm", "dit"])
        owner.stage_started("r1", "llm")
        queued = asyncio.create_task(owner.admit("r2", "p", ["llm"]))
        await until(lambda: _depth_of(other, "llm", 1))
        assert await other.cancel("r1") and await other.cancel("r2") and not await other.cancel("nope")
        await asyncio.wait_for(ticket.wait_cancelled(), 20)
        with pytest.raises(RequestCancelledError):
            await queued
        assert owner.cancelled_ids() == {"r1"} and owner.is_cancelled("r1") and sorted(seen) == ["r1", "r2"]
        with pytest.raises(RequestCancelledError):
            await owner.enter_stage("r1", "dit")
        owner.finished("r1", "cancelled")
        await owner.flush()
        r1, r2 = await other.get_request("r1"), await other.get_request("r2")
        assert r1["state"] == "cancelled" and r1["cancel_requested"] is not None
        assert r2["state"] == "cancelled" and not r2["admitted"]
        assert (await other.get_status())["stages"]["llm"]["running"] == 0
        await owner.close()
        await other.close()
    run(main())


async def _depth_of(c, stage, n):
    return (await c.get_queue_depth()).get(stage) == n


@pytest.mark.ray
def test_tracking_and_monitoring(ray_up):
    async def main():
        c = SchedulerClient.connect("t-mon", OmniSchedulerConfig(default_stage_capacity=2))
        for i in range(3):
            rid = f"r{i}"
            await c.admit(rid, "t2i", ["llm", "dit"], priority="high")
            c.stage_started(rid, "llm")
            c.stage_finished(rid, "llm")
            await c.enter_stage(rid, "dit")
            c.stage_started(rid, "dit")
            c.stage_finished(rid, "dit")
            c.finished(rid, "failed" if i == 2 else "completed", error="boom" if i == 2 else None)
        await c.flush()
        r = await c.get_request("r0")
        assert [h[1:] for h in r["history"]] == [["queued", "llm"], ["running", "llm"], ["queued", "dit"],
                                                  ["running", "dit"], ["completed", "dit"]]
        assert set(r["stage_timestamps"]["dit"]) == {"queued", "granted", "started", "finished"}
        assert (await c.get_request("r2"))["error"] == "boom"
        st = await c.get_status()
        assert st["processed"]["completed"] == 2 and st["processed"]["failed"] == 1
        assert st["stages"]["dit"]["processed"] == 3 and st["stages"]["llm"]["running"] == 0
        m = await c.get_metrics()
        assert m["throughput_rps"] > 0 and m["latency_s"]["p50"] is not None
        assert m["latency_s"]["p50"] <= m["latency_s"]["p99"] and set(m["stage_latency_s"]) == {"llm", "dit"}
        assert (await c.get_health_status())["healthy"]
        assert st["cache_hit_rate"] is None and m["cache_utilization"] is None    # no DiT cache yet
        cache = DiTCacheClient.connect("t-mon", DiTCacheConfig(max_bytes=1000))
        await cache.put("k", b"x" * 100)
        await cache.get("k")
        await cache.get("missing")
        st, m = await c.get_status(), await c.get_metrics()
        assert st["cache_hit_rate"] == 0.5 and st["cache"]["entries"] == 1 and m["cache_utilization"] == 0.1
        kill_cache("t-mon")
        c.report_capacity("dit", "replica-a", 0)
        await c.flush()
        h = await c.get_health_status()
        assert not h["healthy"] and any("'dit' has no capacity" in i for i in h["issues"])
        assert await c.get_queue_depth() == {"llm": 0, "dit": 0}
        await c.close()
    run(main())


def test_bad_input_is_typed():
    async def main():
        c = SchedulerClient("t-bad", OmniSchedulerConfig(enabled=False))
        for kw in [dict(priority="urgent"), dict(stages=[]), dict(request_id="")]:
            args = dict(request_id="r", pipeline="p", stages=["s"], priority="normal") | kw
            with pytest.raises(InvalidRequestError):
                await c.admit(**args)
        t = await c.admit("r", "p", ["s"])              # disabled: admitted locally, no Ray needed
        assert t.stage == "s"
        with pytest.raises(InvalidRequestError):
            await c.admit("r", "p", ["s"])
        with pytest.raises(InvalidRequestError):
            c.finished("r", status="done")
        with pytest.raises(InvalidRequestError):
            await c.enter_stage("unknown", "s")
        assert await c.cancel("r") and c.cancelled_ids() == {"r"}
    run(main())


@pytest.mark.ray
def test_scheduler_restart_keeps_requests_going(ray_up):
    async def main():
        cfg = OmniSchedulerConfig(default_stage_capacity=2, unavailable_wait_s=30)   # wait for the restart
        c = SchedulerClient.connect("t-restart", cfg)
        await c.admit("live", "p", ["s"])
        await c.admit("done-later", "p", ["s"])
        queued = asyncio.create_task(c.admit("queued", "p", ["s"]))      # no slot left: waits in the actor
        await until(lambda: _depth(c, 1))
        before = (await c.get_status())["incarnation"]
        ray.kill(get_or_create_scheduler("t-restart", cfg), no_restart=False)
        await until(lambda: _restarted(c, before))
        await until(lambda: _depth(c, 1))               # the client replayed: 2 running, 1 queued again
        assert (await c.get_request("live"))["state"] == "running" and c.stats["resyncs"] >= 1
        c.finished("done-later")                        # in-flight requests finish normally
        t = await queued                                # ...which admits the replayed one
        assert not t.local and (await c.get_request("queued"))["admitted"]
        new = asyncio.create_task(c.admit("new", "p", ["s"]))
        c.finished("queued")
        assert not (await new).local                    # admitted by the restarted actor
        for rid in ("live", "new"):
            c.finished(rid)
        await c.flush()
        for rid in ("live", "queued", "new"):
            assert (await c.get_request(rid))["state"] == "completed"
        st = await c.get_status()
        assert st["incarnation"] != before and st["stages"]["s"]["running"] == 0 and st["queued"] == 0
        await c.close()
        kill_scheduler("t-restart")
    run(main())


@pytest.mark.ray
def test_fail_open_while_unreachable_then_replay(ray_up, monkeypatch):
    import omni_ray.cluster.admission.client as client_mod

    def unreachable(*a, **k):
        raise ConnectionError("scheduler unreachable")

    async def main():
        cfg = OmniSchedulerConfig(unavailable_wait_s=0.2)
        monkeypatch.setattr(client_mod, "get_or_create_scheduler", unreachable)
        c = SchedulerClient("t-open", cfg)              # no handle: every resolution fails
        t = await c.admit("r1", "p", ["s"])             # bounded wait, then admitted locally
        assert t.local and c.down_since is not None and c.stats["fail_open"] == 1
        monkeypatch.undo()                              # the actor becomes reachable
        await until(lambda: _has(c, "r1"))              # the local ticket is replayed to it
        assert c.down_since is None and (await c.get_request("r1"))["state"] == "running"
        c.finished("r1")
        await c.flush()
        assert (await c.get_request("r1"))["state"] == "completed"
        await c.close()
        kill_scheduler("t-open")
    run(main())


async def _has(c, rid):
    try:
        return (await c.get_request(rid)) is not None
    except Exception:
        return False


async def _restarted(c, before):
    try:
        return (await c.get_status())["incarnation"] != before
    except Exception:
        return False
