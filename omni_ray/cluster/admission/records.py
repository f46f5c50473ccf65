"""What the scheduler remembers about a request, and the rolling metrics over finished ones."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

TERMINAL = ("completed", "failed", "cancelled", "client_error")   # client_error: a 4xx, not a failure


@dataclass(slots=True)
class Record:
    rid: str
    pipeline: str
    stages: tuple[str, ...]
    priority: str
    owner: str
    state: str = "queued"                 # queued | running | completed | failed | cancelled | client_error
    stage: str | None = None              # the stage it is queued for or running on
    holds: str | None = None              # the stage whose slot it holds
    waiting: str | None = None            # the stage whose queue it is in
    admitted: bool = False
    error: str | None = None
    cancel_requested: float | None = None
    times: dict = field(default_factory=dict)                      # queued / admitted / finished
    stage_times: dict = field(default_factory=dict)                # stage -> {queued, granted, started, finished}
    history: list = field(default_factory=list)                    # [(t, state, stage)]

    def mark(self, state: str, stage: str | None, t: float) -> None:
        self.state, self.stage = state, stage
        self.history.append((t, state, stage))

    def stamp(self, stage: str, what: str, t: float) -> None:
        self.stage_times.setdefault(stage, {})[what] = t

    def to_dict(self) -> dict:
        return {"request_id": self.rid, "pipeline": self.pipeline, "stages": list(self.stages),
                "priority": self.priority, "owner": self.owner, "state": self.state, "stage": self.stage,
                "admitted": self.admitted, "error": self.error, "cancel_requested": self.cancel_requested,
                "timestamps": dict(self.times), "stage_timestamps": {k: dict(v) for k, v in self.stage_times.items()},
                "history": [list(h) for h in self.history]}


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles in seconds (None without data)."""
    xs = sorted(values)
    if not xs:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": xs[min(len(xs) - 1, max(0, -(-q * len(xs) // 100) - 1))] for q in qs}


class Metrics:
    """Rolling window of finished requests: (t_finished, status, e2e latency, queue wait)."""

    def __init__(self, size: int, window_s: float = 60.0):
        self.done: deque = deque(maxlen=size)
        self.stage_lat: dict[str, deque] = {}
        self.size, self.window_s = size, window_s
        self.started = time.time()

    def record(self, rec: Record, t: float) -> None:
        q, a = rec.times.get("queued", t), rec.times.get("admitted")
        wait = max(0.0, a - q) if a is not None else None
        self.done.append((t, rec.state, max(0.0, t - q), wait))
        for stage, st in rec.stage_times.items():
            s = st.get("started", st.get("granted"))
            if s is not None and "finished" in st:
                self.stage_lat.setdefault(stage, deque(maxlen=self.size)).append(max(0.0, st["finished"] - s))

    def summary(self, now: float) -> dict:
        recent = [d for d in self.done if d[0] >= now - self.window_s]
        span = max(1e-9, min(self.window_s, now - self.started))
        ok = [d for d in recent if d[1] == "completed"]
        return {
            "window_s": self.window_s,
            "throughput_rps": len(ok) / span,
            "finished_rps": len(recent) / span,
            "latency_s": percentiles([d[2] for d in ok]),
            "queue_wait_s": percentiles([d[3] for d in recent if d[3] is not None]),
            "stage_latency_s": {s: percentiles(v) for s, v in self.stage_lat.items()},
            "samples": len(recent),
        }
