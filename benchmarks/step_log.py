"""The engine's step log (``engine.step_log``) read back: what a burst or a run looked like from the
engine, and when its requests got there through Serve.

Each line is a JSON object: an engine step (``t`` wall-clock start, ``dt``, ``seqs``, ``decodes``,
``tokens``, ``forwards``, ``added``: requests added since the previous step, ``gc``: seconds of
garbage collection within it), or, written by the AR replica into the same file, a batched stage
call's arrival (``t``, ``call``: its request count, ``sent``: when the ingress sent it), the
replica's send of new requests to its core process (``t``, ``flush``: how many), or a late wake-up
of its event loop (``t``, ``lag``: seconds late, ``gc``: seconds of collections meanwhile).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def ms(x: float) -> float:
    return round(1000 * x, 2)


def engine_timeline(path: str, wall0: float, n: int, wall_end: float | None = None, batch: int | None = None) -> dict:
    """The engine's steps after ``wall0`` (a burst of ``n`` requests sent then), from its step log
    (and the AR replica's lines for batched stage calls, written to the same file): when the
    requests were sent on by the ingress, reached the replica, reached the engine (ms after
    ``wall0``: first / median / last), how many steps followed, how much of the span the engine
    was stepping, and how long after its last step the client had its last byte (``wall_end``);
    steps after ``wall_end`` are not counted. ``batch``: the batch size whose pure decode steps
    give ``full_batch_ms_per_token`` (default ``n``)."""
    lines = [json.loads(x) for x in Path(path).read_text().splitlines()]
    until = wall_end if wall_end is not None else math.inf
    steps = sorted((s for s in lines if "dt" in s and wall0 <= s["t"] <= until), key=lambda s: s["t"])
    calls = [c for c in lines if "call" in c and c["t"] >= wall0]
    flushes = [f["t"] for f in lines if "flush" in f and wall0 <= f["t"] <= until for _ in range(f["flush"])][:n]
    lags = [x for x in lines if "lag" in x and wall0 <= x["t"] <= until]
    if not steps:
        return {}
    at = lambda t: ms(t - wall0)  # noqa: E731
    added = [s["t"] for s in steps for _ in range(s["added"])][:n]
    quart = lambda xs: [at(xs[0]), at(xs[len(xs) // 2]), at(xs[-1])] if xs else None  # noqa: E731
    end = steps[-1]["t"] + steps[-1]["dt"]
    busy, covered = 0.0, -math.inf            # the union of the steps' spans (async_decode: runs overlap)
    for s in steps:
        start, stop = max(s["t"], covered), s["t"] + s["dt"]
        busy += max(0.0, stop - start)
        covered = max(covered, stop)
    span = end - steps[0]["t"]
    gaps = [b["t"] - (a["t"] + a["dt"]) for a, b in zip(steps, steps[1:])]
    full = [s["dt"] / s["forwards"] for s in steps if s["decodes"] == s["seqs"] == (batch or n)]
    decode = [s for s in steps if s["decodes"] == s["seqs"]]
    prompt = [s for s in steps if s["decodes"] < s["seqs"]]
    out = {"engine_got_requests_ms": quart(added),
           "last_step_end_ms": at(end), "steps": len(steps),
           "mixed_steps": sum(0 < s["decodes"] < s["seqs"] for s in steps),
           "busy_share": round(busy / span, 3) if span > 0 else None,
           "largest_gap_ms": ms(max(gaps)) if gaps else None,
           "full_batch_ms_per_token": round(1000 * statistics.median(full), 3) if full else None,
           "decode_steps": len(decode),
           "forwards_per_decode_step": round(sum(s["forwards"] for s in decode) / len(decode), 2)
           if decode else None, "steps_with_prompts_ms": ms(sum(s["dt"] for s in prompt))}
    gcs = [s["gc"] for s in steps if "gc" in s]
    out["core_gc_ms"] = {"steps": len(gcs), "total": ms(sum(gcs)), "max": ms(max(gcs, default=0))}
    if flushes:
        out["replica_sent_to_core_ms"] = quart(sorted(flushes))
    if lags:
        out["replica_loop_late_ms"] = {"wakeups": len(lags), "total": ms(sum(x["lag"] for x in lags)),
                                       "max": ms(max(x["lag"] for x in lags)), "gc": ms(sum(x["gc"] for x in lags))}
    if calls:
        out["stage_calls"] = len(calls)
        out["requests_per_call"] = round(statistics.mean(c["call"] for c in calls), 1)
        out["ingress_sent_ms"] = quart(sorted(c["sent"] for c in calls if c["sent"]))
        out["replica_got_ms"] = quart(sorted(c["t"] for c in calls))
    if wall_end is not None:
        out["client_done_after_last_step_ms"] = at(wall_end - end + wall0)
    return out
