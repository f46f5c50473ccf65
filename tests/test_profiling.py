"""The step log's probes: garbage-collection pauses and event-loop lag."""

import asyncio
import gc
import time

from omni_ray.profiling import GcPauses, LoopLag


def test_gc_pauses_counts_collections_and_resets_on_take():
    probe = GcPauses()
    try:
        probe.take()
        gc.collect()
        n, seconds = probe.take()
        assert n >= 1 and seconds > 0
        assert probe.take() == (0, 0.0)
    finally:
        probe.close()
    gc.collect()
    assert probe.take() == (0, 0.0)            # closed: no longer counting


def test_loop_lag_reports_a_blocked_loop_and_nothing_when_idle():
    lines = []

    async def main():
        lag = LoopLag(lines.append, period_s=0.002, threshold_s=0.03)
        lag.start()
        await asyncio.sleep(0.05)              # idle: on time (30 ms of slack)
        idle = len(lines)
        t0 = time.time()
        time.sleep(0.1)                        # the loop is stuck for 100 ms
        await asyncio.sleep(0.02)
        lag.stop()
        return idle, t0

    idle, t0 = asyncio.run(main())
    assert idle == 0
    assert len(lines) == 1 and lines[0]["lag"] >= 0.09 and abs(lines[0]["t"] - t0) < 0.01
