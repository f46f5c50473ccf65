"""The DiT families' GEMMs alone: TFLOP/s of each shape, by cuBLAS path, against the measured bf16 peak.

Qwen-Image at 512 and 1024 px (8 requests with negatives: 16 rows; the caption stream packed to 1,024
tokens) and Wan 14B at 81 frames (one video with CFG: 2 rows x 32,760 tokens): each GEMM as ``F.linear``
with its bias, as a plain ``x @ w.t()``, and, for the MLP's first GEMM, with GELU in cuBLASLt's epilogue
(``torch._addmm_activation``, what the blocks run) and as ``F.linear`` + a compiled GELU; once with
cuBLAS preferred, once with cuBLASLt (``torch.backends.cuda.preferred_blas_library``). One timing of 30
calls each, printed (and ``gemm_shapes_cuda.json``).

    python benchmarks/bench_gemm_shapes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cuda_seconds, matmul_peak, write_result  # noqa: E402

# (name, rows, in, out)
SHAPES = [("qwen-image 512 image q/k/v", 16384, 3072, 9216), ("qwen-image 512 image out", 16384, 3072, 3072),
          ("qwen-image 512 image up", 16384, 3072, 12288), ("qwen-image 512 image down", 16384, 12288, 3072),
          ("qwen-image 512 caption q/k/v", 1024, 3072, 9216), ("qwen-image 512 caption up", 1024, 3072, 12288),
          ("qwen-image 512 caption down", 1024, 12288, 3072), ("qwen-image 512 caption out", 1024, 3072, 3072),
          ("qwen-image 1024 image q/k/v", 65536, 3072, 9216), ("qwen-image 1024 image out", 65536, 3072, 3072),
          ("qwen-image 1024 image up", 65536, 3072, 12288), ("qwen-image 1024 image down", 65536, 12288, 3072),
          ("wan 14b q/k/v", 65520, 5120, 15360), ("wan 14b out", 65520, 5120, 5120),
          ("wan 14b up", 65520, 5120, 13824), ("wan 14b down", 65520, 13824, 5120)]


def rates(m: int, k: int, n: int, up: bool, gelu) -> dict:
    """TFLOP/s of one [m, k] x [k, n] GEMM, each way the blocks could run it."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    tflop = 2 * m * k * n / 1e12
    out = dict(linear_bias=tflop / cuda_seconds(lambda: F.linear(x, w, b), 30),
               mm=tflop / cuda_seconds(lambda: x @ w.t(), 30))
    if up:
        out["addmm_gelu"] = tflop / cuda_seconds(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True), 30)
        out["linear_compiled_gelu"] = tflop / cuda_seconds(lambda: gelu(F.linear(x, w, b)), 30)
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_gemm_shapes.py times CUDA GEMMs: no GPU here")
    peak = matmul_peak() / 1e12
    print(f"peak {peak:.0f} TFLOP/s")
    gelu = torch.compile(lambda y: F.gelu(y, approximate="tanh"))
    rows = []
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for name, m, k, n in SHAPES:
            row = dict(blas=lib, gemm=name, shape=f"{m}x{k}x{n}") | rates(m, k, n, name.endswith(" up"), gelu)
            rows.append(row)
            print(" | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    print(write_result("gemm_shapes_cuda.json", dict(peak_tflops=peak, rows=rows)))


if __name__ == "__main__":
    main()
