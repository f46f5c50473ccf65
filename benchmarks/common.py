"""Shared helpers for the benchmarks: device bandwidth, timing, result files, tables."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy, bytes read + written per second (the memory roofline)."""
    if not torch.cuda.is_available():
        return float("nan")
    n = int(gib * 2**30) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * n * 2 / sorted(times)[len(times) // 2]


def cuda_seconds(fn, reps: int = 20, warmup: int = 3) -> float:
    """Mean seconds per call of ``fn`` on the current CUDA stream: ``reps`` calls back to back after ``warmup``."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def matmul_peak(n: int = 8192, reps: int = 20) -> float:
    """The measured bf16 matmul rate (FLOP/s) of an n x n x n GEMM: the peak compute-bound kernels are held to."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / cuda_seconds(lambda: a @ b, reps)


def psnr(a, b) -> float:
    """PSNR in dB of two images / videos in [0, 1] (inf when equal)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    def __enter__(self):
        sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.s = time.perf_counter() - self.t0


def time_denoise_runs(run, steps: int, reps: int, warm_steps: int = 2) -> dict:
    """A DiT bench's timing of ``run(steps, output_type)``: one warm-up run of ``warm_steps`` (compile, CUDA
    graphs, kernel choice), one kept output, then ``reps`` times the whole run and the denoising alone
    (``output_type="latent"``), best of each."""
    run(warm_steps, "np")
    out = run(steps, "np")
    lat, den = [], []
    for _ in range(reps):
        with Timer() as t:
            run(steps, "np")
        lat.append(t.s)
        with Timer() as t:
            run(steps, "latent")
        den.append(t.s)
    return {"latency_s": min(lat), "latent_s": min(den), "step_ms": 1e3 * min(den) / steps, "latency_all_s": lat,
            "output": out}


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100) of xs: the nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    data = {"device": device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")} | data
    path.write_text(json.dumps(data, indent=2))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def kernel_profile(run, top: int = 20) -> list[dict]:
    """Where ``run()``'s device time goes: torch.profiler over one call, the ``top`` kernels by total time
    (CUDA kernels on a GPU, CPU ops elsewhere) as rows {kernel, ms, share, calls}, sorted."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events) or 1.0
    rows = [{"kernel": e.key[:120], "ms": own(e) / 1e3, "share": own(e) / total, "calls": e.count}
            for e in events if own(e) > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:top]
