"""The scheduler's state machine: admission, per-stage slots, tracking, cancellation, reports.

Plain Python without Ray or asyncio (the actor wraps it), so every rule here runs in unit tests.
Clients talk to it in batches of small tuples (events, below); what each client must learn
(grants, refusals, cancellations) collects in its outbox until its next call takes it.

Events (all idempotent, so a client may resend a batch after a failed call):
    ("admit", rid, pipeline, stages, priority, t)      queue for stages[0]; refused past the bound
    ("enter", rid, stage, t)                           free the held slot, queue for a later stage
    ("start", rid, stage, t)                           the stage's engine call began (takes a slot
                                                       without waiting if none is held there)
    ("stage_done", rid, stage, t)                      free the stage's slot
    ("finish", rid, status, error, t)                  terminal: completed | failed | cancelled |
                                                       client_error (a 4xx: the caller's, not a failure)
    ("cancel_req", rid, t)                             the owner learnt of a cancel itself (tracking)
    ("capacity", stage, replica_id, capacity|None)     a replica's concurrency (None: replica gone)
    ("resync", [rids])                                 after a restart/failure: the client's live set
    ("register", rid, pipeline, stages, priority, stage, t_queued, t_admitted)   a live request
    ("lease_admit", rid, pipeline, stages, priority, t)  admitted by the client on its lease
    ("lease_return", stage, n, t)                      unused lease slots given back (on revoke)

Leases (``admission_lease``): while a stage has no queue, each client that admits to it is lent
a few of its free slots (never more than half of them) in every reply; it admits on them
locally, with no round trip, and reports each ("lease_admit"). Lent slots count as taken. When a
request has to queue at the stage, every client holding a lease there is told to give back
what it has not used ("revoked"), and no more is lent until the queue is empty again.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from omni_ray.cluster.admission.queue import FairQueue
from omni_ray.cluster.admission.records import TERMINAL, Metrics, Record
from omni_ray.config import OmniSchedulerConfig


class Stage:
    def __init__(self, name: str, queue: FairQueue):
        self.name = name
        self.queue = queue
        self.replicas: dict[str, int] = {}
        self.running: set[str] = set()
        self.leases: dict[str, int] = {}           # client -> slots lent to it, not yet used
        self.revoking: set[str] = set()            # clients told to give their lease back
        self.processed = 0

    def capacity(self, default: int) -> int:
        return sum(self.replicas.values()) if self.replicas else default

    def taken(self) -> int:
        return len(self.running) + sum(self.leases.values())


class Outbox:
    __slots__ = ("granted", "rejected", "cancelled", "revoked")

    def __init__(self):
        self.granted, self.rejected, self.cancelled, self.revoked = [], [], [], []

    def __bool__(self) -> bool:
        return bool(self.granted or self.rejected or self.cancelled or self.revoked)


class SchedulerCore:
    def __init__(self, config: OmniSchedulerConfig, clock=time.time):
        self.cfg = config
        self.clock = clock
        self.weights = config.priority_weights.model_dump()
        self.stages: dict[str, Stage] = {}
        self.live: dict[str, Record] = {}
        self.done: OrderedDict[str, Record] = OrderedDict()
        self.outbox: dict[str, Outbox] = {}
        self.dirty: set[str] = set()                 # clients with something in their outbox
        self.seen: dict[str, float] = {}             # client -> last contact
        self.lease_stages: dict[str, set[str]] = {}  # client -> stages it admits to (lent slots there)
        self.queued = 0                              # not yet admitted (the bounded queue)
        self.counts = dict.fromkeys(("admitted", "rejected", "id_conflicts", *TERMINAL), 0)
        self.metrics = Metrics(config.history_size)

    # ------------------------------------------------------------------ client protocol
    def handle(self, client: str, events: list) -> None:
        self.seen[client] = self.clock()
        for ev in events:
            getattr(self, "_ev_" + ev[0])(client, *ev[1:])

    def take(self, client: str) -> dict:
        """Drain a client's outbox, and lend it slots where it admits and nothing queues."""
        box = self.outbox.pop(client, None) or Outbox()
        self.dirty.discard(client)
        return {"granted": box.granted, "rejected": box.rejected, "cancelled": box.cancelled,
                "revoked": box.revoked, "leased": self._lend(client)}

    def _lend(self, client: str) -> list[tuple[str, int]]:
        """Top the client's lease up to ``admission_lease`` on each stage it admits to, from at most
        half the stage's free slots, while that stage has no queue."""
        size, out = self.cfg.admission_lease, []
        for name in self.lease_stages.get(client, ()) if size else ():
            st = self.stages[name]
            if len(st.queue) or client in st.revoking:
                continue
            held = st.leases.get(client, 0)
            n = min(size - held, (st.capacity(self.cfg.default_stage_capacity) - st.taken()) // 2)
            if n > 0:
                st.leases[client] = held + n
                out.append((name, n))
        return out

    def _ev_admit(self, client, rid, pipeline, stages, priority, t):
        rec = self.live.get(rid)
        if rec is not None:
            if rec.owner != client:
                self._box(client).rejected.append((rid, "invalid", f"request id {rid!r} is already in use"))
            elif rec.admitted and rec.holds is not None:      # a replay: the grant's reply was lost
                self._box(client).granted.append((rid, rec.holds))
            return
        rec = Record(rid, pipeline, tuple(stages), priority, client, times={"queued": t})
        rec.mark("queued", stages[0], t)
        stage = self._stage(stages[0])
        full = self.queued >= self.cfg.max_queue_size
        if len(stage.running) >= stage.capacity(self.cfg.default_stage_capacity) and full:
            self.counts["rejected"] += 1
            self._box(client).rejected.append((rid, "queue_full", f"the scheduler queue is full "
                                               f"({self.queued}/{self.cfg.max_queue_size} queued)"))
            return
        self.live[rid] = rec
        self.queued += 1
        self.lease_stages.setdefault(client, set()).add(stage.name)
        self._enqueue(rec, stage, t)

    def _ev_lease_admit(self, client, rid, pipeline, stages, priority, t):
        known = self.live.get(rid) or self.done.get(rid)
        if known is not None and known.owner == client:      # a replay
            return
        stage = self._stage(stages[0])
        held = stage.leases.get(client, 0)
        if held > 1:
            stage.leases[client] = held - 1
        else:                   # its last lent slot (or one taken back meanwhile: admitted all the same)
            stage.leases.pop(client, None)
            stage.revoking.discard(client)
        self.lease_stages.setdefault(client, set()).add(stage.name)
        self.counts["admitted"] += 1
        if known is not None and rid in self.live:           # another client's live id: the slot is used,
            self.counts["id_conflicts"] += 1                 # not tracked (ids must be unique; see docs)
            self._pump(stage)
            return
        self._ev_register(client, rid, pipeline, stages, priority, stage.name, t, t)

    def _ev_lease_return(self, client, stage_name, n, t):
        stage = self._stage(stage_name)
        left = stage.leases.get(client, 0) - n
        if left > 0:
            stage.leases[client] = left
        else:
            stage.leases.pop(client, None)
            stage.revoking.discard(client)
        self._pump(stage)

    def _drop_leases(self, client: str) -> None:
        """Forget what ``client`` was lent (it restarted, resynced or went silent)."""
        self.lease_stages.pop(client, None)
        for st in self.stages.values():
            st.revoking.discard(client)
            if st.leases.pop(client, None):
                self._pump(st)

    def _ev_enter(self, client, rid, stage_name, t):
        rec = self.live.get(rid) or self._adopt(client, rid, stage_name, t)
        if rec is None or stage_name == rec.waiting:
            return
        if stage_name == rec.holds:                          # a replay: the grant's reply was lost
            self._box(client).granted.append((rid, stage_name))
            return
        self._release(rec)
        rec.mark("queued", stage_name, t)
        self._enqueue(rec, self._stage(stage_name), t)

    def _ev_start(self, client, rid, stage_name, t):
        rec = self.live.get(rid) or self._adopt(client, rid, stage_name, t)
        if rec is None:
            return
        if rec.holds != stage_name:
            self._withdraw(rec)
            self._release(rec)
            self._hold(rec, self._stage(stage_name), t)
        rec.stamp(stage_name, "started", t)

    def _ev_stage_done(self, client, rid, stage_name, t):
        rec = self.live.get(rid)
        if rec is None:
            return
        rec.stamp(stage_name, "finished", t)
        if rec.holds == stage_name:
            self._release(rec)
            self._stage(stage_name).processed += 1

    def _ev_finish(self, client, rid, status, error, t):
        rec = self.live.get(rid)
        if rec is not None:
            self._finalize(rec, status if status in TERMINAL else "failed", error, t)

    def _ev_cancel_req(self, client, rid, t):
        rec = self.live.get(rid)
        if rec is not None and rec.cancel_requested is None:
            rec.cancel_requested = t

    def _ev_capacity(self, client, stage_name, replica_id, capacity):
        self.set_capacity(stage_name, replica_id, capacity)

    def _ev_resync(self, client, rids):
        self._drop_leases(client)                            # the client starts over without one
        keep = set(rids)
        for rec in [r for r in self.live.values() if r.owner == client]:
            if rec.rid not in keep:
                self._finalize(rec, "failed", "dropped: its client no longer holds it", self.clock())
            elif rec.cancel_requested is not None:           # the notice may have been lost
                self._box(client).cancelled.append(rec.rid)

    def _ev_register(self, client, rid, pipeline, stages, priority, stage_name, t_queued, t_admitted):
        old = self.live.get(rid)
        if old is not None:
            if old.owner == client and not old.admitted:     # the client admitted it locally (fail open)
                self._withdraw(old)
                old.admitted, old.times["admitted"] = True, t_admitted
                self.counts["admitted"] += 1
                if stage_name is not None:
                    self._hold(old, self._stage(stage_name), t_admitted)
            return
        rec = Record(rid, pipeline, tuple(stages), priority, client, admitted=True,
                     times={"queued": t_queued, "admitted": t_admitted})
        rec.history.append((t_queued, "queued", stages[0]))
        self.live[rid] = rec
        if stage_name is not None:
            self._hold(rec, self._stage(stage_name), t_admitted)
        else:
            rec.mark("running", None, t_admitted)

    def _adopt(self, client, rid, stage_name, t) -> Record | None:
        """An event for a request this incarnation never saw (it restarted): take it as admitted."""
        if rid in self.done:
            return None
        self._ev_register(client, rid, "unknown", (stage_name,), "normal", None, t, t)
        return self.live[rid]

    # ------------------------------------------------------------------ operator API
    def cancel(self, rid: str) -> bool:
        """Cancel from anywhere: a queued request ends now; a running one is told to its owner,
        which aborts the engine call and reports ``finish(cancelled)``."""
        rec = self.live.get(rid)
        if rec is None:
            return False
        now = self.clock()
        if rec.cancel_requested is None:
            rec.cancel_requested = now
        self._box(rec.owner).cancelled.append(rid)
        if not rec.admitted:
            self._finalize(rec, "cancelled", "cancelled while queued", now)
        else:
            self._withdraw(rec)
        return True

    def set_capacity(self, stage_name: str, replica_id: str, capacity: int | None) -> None:
        stage = self._stage(stage_name)
        if capacity is None:
            stage.replicas.pop(replica_id, None)
        else:
            stage.replicas[replica_id] = max(0, int(capacity))
        self._pump(stage)

    def reap(self) -> int:
        """Fail the live requests of clients silent for ``owner_timeout_s`` (a dead ingress replica)."""
        now = self.clock()
        stale = {c for c, t in self.seen.items() if now - t > self.cfg.owner_timeout_s}
        recs = [r for r in self.live.values() if r.owner in stale]
        for rec in recs:
            self._finalize(rec, "failed", "owner lost: its ingress replica stopped calling", now)
        for c in stale:
            self._drop_leases(c)
            self.seen.pop(c, None)
            self.outbox.pop(c, None)
            self.dirty.discard(c)
        return len(recs)

    def request(self, rid: str) -> dict | None:
        rec = self.live.get(rid) or self.done.get(rid)
        return rec.to_dict() if rec else None

    # ------------------------------------------------------------------ slots and queues
    def _stage(self, name: str) -> Stage:
        st = self.stages.get(name)
        if st is None:
            st = self.stages[name] = Stage(name, FairQueue(self.cfg.policy, self.weights))
        return st

    def _enqueue(self, rec: Record, stage: Stage, t: float) -> None:
        rec.waiting = stage.name
        rec.stamp(stage.name, "queued", t)
        stage.queue.push(rec.rid, rec.priority)
        self._pump(stage)

    def _pump(self, stage: Stage) -> None:
        cap = stage.capacity(self.cfg.default_stage_capacity)
        while stage.taken() < cap:
            rid = stage.queue.pop()
            if rid is None:
                return
            rec = self.live[rid]
            rec.waiting = None
            now = self.clock()
            if not rec.admitted:
                rec.admitted = True
                rec.times["admitted"] = now
                self.queued -= 1
                self.counts["admitted"] += 1
            self._hold(rec, stage, now)
            self._box(rec.owner).granted.append((rid, stage.name))
        if len(stage.queue):                                 # full with a queue: take the leases back
            for client, n in stage.leases.items():
                if n and client not in stage.revoking:
                    stage.revoking.add(client)
                    self._box(client).revoked.append(stage.name)

    def _hold(self, rec: Record, stage: Stage, t: float) -> None:
        rec.holds = stage.name
        stage.running.add(rec.rid)
        rec.stamp(stage.name, "granted", t)
        rec.mark("running", stage.name, t)

    def _release(self, rec: Record) -> None:
        if rec.holds is not None:
            stage = self.stages[rec.holds]
            stage.running.discard(rec.rid)
            rec.holds = None
            self._pump(stage)

    def _withdraw(self, rec: Record) -> None:
        if rec.waiting is not None:
            self.stages[rec.waiting].queue.remove(rec.rid)
            rec.waiting = None
            if not rec.admitted:
                self.queued -= 1

    def _finalize(self, rec: Record, status: str, error: str | None, t: float) -> None:
        self._withdraw(rec)
        self._release(rec)
        rec.error = error
        rec.times["finished"] = t
        rec.mark(status, rec.stage, t)
        self.counts[status] += 1
        del self.live[rec.rid]
        self.done[rec.rid] = rec
        while len(self.done) > self.cfg.history_size:
            self.done.popitem(last=False)
        self.metrics.record(rec, t)

    def _box(self, client: str) -> Outbox:
        self.dirty.add(client)
        box = self.outbox.get(client)
        if box is None:
            box = self.outbox[client] = Outbox()
        return box

    # ------------------------------------------------------------------ reports
    def queue_depth(self) -> dict[str, int]:
        return {name: len(st.queue) for name, st in self.stages.items()}

    def status(self) -> dict:
        d = self.cfg.default_stage_capacity
        return {
            "policy": self.cfg.policy,
            "queued": self.queued,
            "max_queue_size": self.cfg.max_queue_size,
            "live": len(self.live),
            "stages": {n: {"capacity": st.capacity(d), "running": len(st.running), "queued": len(st.queue),
                           "leased": sum(st.leases.values()),
                           "queued_by_priority": st.queue.depth(), "replicas": dict(st.replicas),
                           "processed": st.processed} for n, st in self.stages.items()},
            "processed": dict(self.counts),
            "clients": len(self.seen),
        }

    def metrics_summary(self) -> dict:
        d = self.cfg.default_stage_capacity
        m = self.metrics.summary(self.clock())
        q_max = self.cfg.max_queue_size
        m["queue_utilization"] = self.queued / q_max if q_max else float(self.queued > 0)
        m["stage_utilization"] = {n: (len(st.running) / c if (c := st.capacity(d)) else None)
                                  for n, st in self.stages.items()}
        m["processed"] = dict(self.counts)
        return m

    def health(self) -> dict:
        now, d, issues = self.clock(), self.cfg.default_stage_capacity, []
        limit = self.cfg.max_queue_size
        if limit and self.queued >= 0.9 * limit:
            issues.append(f"queue near full: {self.queued}/{limit} queued")
        for n, st in self.stages.items():
            if st.capacity(d) == 0:
                issues.append(f"stage {n!r} has no capacity ({len(st.queue)} waiting)")
        stuck = [r.rid for r in self.live.values() if r.holds is not None
                 and now - r.stage_times[r.holds].get("granted", now) > self.cfg.stuck_after_s]
        if stuck:
            issues.append(f"{len(stuck)} request(s) stuck over {self.cfg.stuck_after_s:g}s: {', '.join(stuck[:5])}")
        return {"healthy": not issues, "issues": issues, "stuck": stuck[:100], "checked_at": now}
