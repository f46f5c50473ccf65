"""How one CUDA stream's kernels fare beside the others', from a torch.profiler chrome trace (``bench_omni_speech.py
--kernel-trace``): per stream, its kernels' count and device time, and their mean duration split by whether any
other stream had a kernel running at the same time. A stream whose kernels take several times longer beside the
others' than alone is slowed on the GPU by what runs beside it (SMs, memory bandwidth), not by its host thread.
``busy_ms`` is the time its kernels cover (their union): below ``device_ms`` when the stream's own kernels overlap
(programmatic dependent launch starts a kernel early, to wait on the device for the one before), where per-kernel
durations include those waits; ``busy_beside_pct`` is the share of ``busy_ms`` with another stream's kernels running.

    python benchmarks/stream_overlap.py trace.json.gz      # a table per stream
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys
from pathlib import Path


def kernels(trace: dict) -> dict[int, list[tuple[float, float, str]]]:
    """The trace's CUDA kernels per stream: {stream: [(start us, end us, name)]}, each list sorted by start."""
    out: dict[int, list[tuple[float, float, str]]] = {}
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") != "kernel" or "stream" not in ev.get("args", {}):
            continue
        t = float(ev["ts"])
        out.setdefault(int(ev["args"]["stream"]), []).append((t, t + float(ev.get("dur", 0.0)), ev.get("name", "")))
    for ks in out.values():
        ks.sort()
    return out


def union(spans: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Sorted, merged intervals as (starts, ends)."""
    starts: list[float] = []
    ends: list[float] = []
    for a, b in sorted(spans):
        if ends and a <= ends[-1]:
            ends[-1] = max(ends[-1], b)
        else:
            starts.append(a)
            ends.append(b)
    return starts, ends


def covered(a: float, b: float, starts: list[float], ends: list[float]) -> float:
    """How much of [a, b) the merged intervals cover."""
    i = max(bisect.bisect_right(starts, a) - 1, 0)
    total = 0.0
    while i < len(starts) and starts[i] < b:
        total += max(0.0, min(b, ends[i]) - max(a, starts[i]))
        i += 1
    return total


def overlap_table(trace: dict) -> list[dict]:
    """Per stream: kernels, device ms, first / last kernel (ms from the trace's first kernel), and the mean
    kernel duration (us) of kernels that ran entirely beside another stream's kernels vs entirely alone."""
    per = kernels(trace)
    t0 = min((ks[0][0] for ks in per.values() if ks), default=0.0)
    rows = []
    for s, ks in sorted(per.items()):
        starts, ends = union([(a, b) for o, oks in per.items() if o != s for a, b, _ in oks])
        own_starts, own_ends = union([(a, b) for a, b, _ in ks])
        busy = sum(b - a for a, b in zip(own_starts, own_ends))
        busy_beside = sum(covered(a, b, starts, ends) for a, b in zip(own_starts, own_ends))
        beside, alone = [], []
        for a, b, _ in ks:
            c = covered(a, b, starts, ends)
            if b > a and c >= b - a:
                beside.append(b - a)
            elif c == 0.0:
                alone.append(b - a)
        rows.append(dict(stream=s, kernels=len(ks), device_ms=sum(b - a for a, b, _ in ks) / 1e3, busy_ms=busy / 1e3,
                         busy_beside_pct=100 * busy_beside / busy if busy else None,
                         first_ms=(ks[0][0] - t0) / 1e3, last_ms=(ks[-1][1] - t0) / 1e3,
                         beside=len(beside), beside_mean_us=sum(beside) / len(beside) if beside else None,
                         alone=len(alone), alone_mean_us=sum(alone) / len(alone) if alone else None))
    return rows


def load(path: str | Path) -> dict:
    p = Path(path)
    with (gzip.open(p, "rt") if p.suffix == ".gz" else p.open()) as f:
        return json.load(f)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import table

    print(table(overlap_table(load(sys.argv[1])), ["stream", "kernels", "device_ms", "busy_ms", "busy_beside_pct",
                                                   "first_ms", "last_ms", "beside", "beside_mean_us", "alone",
                                                   "alone_mean_us"]))
