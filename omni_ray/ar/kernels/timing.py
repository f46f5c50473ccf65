"""Timing GPU work the way a decode step runs it: captured once in a CUDA graph, replayed."""

from __future__ import annotations

from typing import Callable

import torch


def graph_us(fn: Callable[[], object], reps: int = 10, rounds: int = 5) -> float:
    """Microseconds per replay of a CUDA graph of ``fn`` (best of ``rounds`` x ``reps`` replays).
    ``fn`` runs three times first, outside the graph (compilation, autotuning, first launches)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(rounds):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    return best
