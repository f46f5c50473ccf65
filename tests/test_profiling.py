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


def test_busy_share_counts_overlapping_runs_once(tmp_path):
    """With async_decode a run's span starts before the previous one is applied: the engine's busy
    time is the union of the spans, not their sum."""
    import json

    from benchmarks.step_log import engine_timeline

    step = {"seqs": 2, "decodes": 2, "tokens": 2, "forwards": 4, "added": 0}
    spans = [(0.0, 0.010), (0.008, 0.010), (0.030, 0.010)]           # (start, duration) in s
    path = tmp_path / "steps.jsonl"
    path.write_text("\n".join(json.dumps(step | {"t": 100 + t, "dt": dt}) for t, dt in spans))
    tl = engine_timeline(str(path), 100.0, 2, 100.05)
    assert tl["busy_share"] == round(0.028 / 0.040, 3) and tl["steps"] == 3


def test_frozen_startup_heap_is_skipped_by_full_collections():
    from omni_ray.heap import freeze_startup_heap

    built = [[i] for i in range(20_000)]          # a start-up heap's tracked objects
    before = gc.get_freeze_count()
    freeze_startup_heap()                          # (left frozen: what every engine process does)
    assert gc.get_freeze_count() >= before + len(built)
    assert not any(x is built for x in gc.get_objects(generation=2))     # out of the oldest generation


def test_kernel_profile_ranks_where_the_time_goes():
    import torch

    from benchmarks.common import kernel_profile

    a = torch.randn(256, 256)
    rows = kernel_profile(lambda: [a @ a for _ in range(20)] + [a + 1], top=5)
    assert rows and rows[0]["ms"] >= rows[-1]["ms"]
    assert "mm" in rows[0]["kernel"] and rows[0]["calls"] == 20
    assert 0 < sum(r["share"] for r in rows) <= 1.0 + 1e-9


def test_stream_overlap_splits_kernels_beside_other_streams_from_alone(tmp_path):
    """benchmarks/stream_overlap.py on a made-up chrome trace: stream 7's kernels at 0-10 and 40-50 us run alone,
    its 20-30 us kernel inside stream 9's 15-35 us one; a kernel half covered counts as neither."""
    import gzip
    import json

    from benchmarks.stream_overlap import load, overlap_table

    def k(stream, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "args": {"stream": stream}}

    trace = {"traceEvents": [k(7, 1000, 10), k(7, 1020, 10), k(7, 1040, 10), k(9, 1015, 20), k(9, 1045, 10),
                             {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5, "args": {}}]}
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    rows = {r["stream"]: r for r in overlap_table(load(path))}
    s7, s9 = rows[7], rows[9]
    assert (s7["kernels"], s7["device_ms"], s7["first_ms"], s7["last_ms"]) == (3, 0.03, 0.0, 0.05)
    assert (s7["beside"], s7["beside_mean_us"], s7["alone"], s7["alone_mean_us"]) == (1, 10.0, 1, 10.0)  # 40-50: half
    assert (s9["beside"], s9["alone"], s9["alone_mean_us"]) == (0, 0, None)      # both kernels half beside stream 7
    # busy: the union of a stream's kernels; stream 7 is busy 30 us, 15 of them beside stream 9 (20-30, 40-45)
    assert s7["busy_ms"] == 0.03 and s7["busy_beside_pct"] == 50.0
    # a stream whose kernels overlap each other (launched early, waiting on the device): busy below device time
    trace["traceEvents"] += [k(11, 2000, 10), k(11, 2005, 10)]
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    s11 = {r["stream"]: r for r in overlap_table(load(path))}[11]
    assert (s11["device_ms"], s11["busy_ms"], s11["busy_beside_pct"]) == (0.02, 0.015, 0.0)
