"""Profiling probes for the step log (``engine.step_log``): where a process's time went that its
own timings cannot show.

    gc = GcPauses()            # from now on, every garbage collection's pause is counted
    n, seconds = gc.take()     # collections and their pauses since the previous take()

    lag = LoopLag(write)       # an asyncio task: write({"t", "lag", "gc"}) when the loop was late
    lag.start(); ...; lag.stop()

A collection of the oldest generation walks every tracked object (215 k after importing torch
and transformers: ~65 ms on the CI box); the engine's core process freezes its start-up heap so
that those pauses go (``gc.freeze()``, as vLLM's engine core and Serve's replicas do).
"""

from __future__ import annotations

import asyncio
import gc
import time


class GcPauses:
    """Counts garbage collections and their pauses (every thread of this process)."""

    def __init__(self):
        self.count, self.seconds, self._t0 = 0, 0.0, 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._t0

    def take(self) -> tuple[int, float]:
        """(collections, seconds paused) since the previous call."""
        out, self.count, self.seconds = (self.count, self.seconds), 0, 0.0
        return out

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


class LoopLag:
    """How late an event loop runs what is due: a task sleeps ``period_s`` over and over and, when
    it wakes more than ``threshold_s`` late (the loop was busy, or stopped for a collection),
    writes {"t": wall-clock, "lag": seconds late, "gc": seconds of collections meanwhile}."""

    def __init__(self, write, period_s: float = 0.002, threshold_s: float = 0.001):
        self.write, self.period_s, self.threshold_s = write, period_s, threshold_s
        self.gc = GcPauses()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.period_s)
            lag = time.perf_counter() - t0 - self.period_s
            _, gc_s = self.gc.take()
            if lag > self.threshold_s:
                self.write({"t": round(time.time() - lag, 6), "lag": round(lag, 6), "gc": round(gc_s, 6)})

    def stop(self) -> None:
        if self._task is not None and not self._task.get_loop().is_closed():
            self._task.cancel()
        self._task = None
        self.gc.close()
