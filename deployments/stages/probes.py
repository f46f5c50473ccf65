"""Profiling probes of a stage replica, beside its shim: with ``engine.step_log`` set, one JSON line
per batched call (when it arrived, how many requests, when the sender sent it) and the replica's
event-loop lag, in the same file as the engine's step lines (benchmarks/step_log.py reads them).

    call_log = CallLog.open(cfg.engine.step_log)       # None without a step log
    call_log.call(len(reqs), sent_at); ...; call_log.close()
"""

from __future__ import annotations

import json
import time

from omni_ray.profiling import LoopLag


class CallLog:
    def __init__(self, file):
        self.file = file
        self.loop_lag: LoopLag | None = None      # started on the first call (it needs the replica's loop)

    @classmethod
    def open(cls, path: str | None) -> CallLog | None:
        return cls(open(path, "a", buffering=1)) if path else None   # noqa: SIM115 - closed by close()

    def write(self, line: dict) -> None:
        self.file.write(json.dumps(line) + "\n")

    def call(self, n: int, sent_at: float | None) -> None:
        if self.loop_lag is None:
            self.loop_lag = LoopLag(self.write)
            self.loop_lag.start()
        self.write({"t": round(time.time(), 6), "call": n, "sent": round(sent_at, 6) if sent_at else None})

    def close(self) -> None:
        if self.loop_lag is not None:
            self.loop_lag.stop()
        self.file.close()
