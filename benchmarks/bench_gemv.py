"""Batch-1 projections of a decode step: the fused Triton GEMV (omni_ray/ar/kernels/triton_gemv.py)
against cuBLAS with separate elementwise kernels, per projection shape and tile configuration.

    python benchmarks/bench_gemv.py                      # GPU: Qwen3-0.6B layer shapes
    python benchmarks/bench_gemv.py --layers 36 --hidden 4096 --intermediate 12288 --heads 32 --kv-heads 8

Each measurement is a CUDA graph that runs the op once per layer, every layer with its own weight
(a decode step reads weights from HBM, not L2), replayed; time per op and effective bandwidth.
Writes benchmarks/results/gemv_cuda.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copy_bandwidth  # noqa: E402
from omni_ray.ar.kernels.timing import graph_us  # noqa: E402
from omni_ray.ar.kernels.triton_gemv import default_config, gemv  # noqa: E402
from omni_ray.ar.layers.ops import Ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev, dt, L, h = "cuda", torch.bfloat16, a.layers, a.hidden
    qkv_n = (a.heads + 2 * a.kv_heads) * a.head_dim
    shapes = {  # name: (N, K, prologue)
        "qkv (norm+residual)": (qkv_n, h, "norm"),
        "o_proj": (h, a.heads * a.head_dim, "none"),
        "gate_up (norm+residual)": (2 * a.intermediate, h, "norm"),
        "down (silu_mul)": (h, a.intermediate, "silu_mul"),
    }
    ops = Ops().compile()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; {L} layers, M={a.m}")
    out = {"device": torch.cuda.get_device_name(0), "copy_bandwidth_Bps": bw, "layers": L, "m": a.m, "shapes": {}}
    tot = {"cublas": 0.0, "cublas_with_prologue": 0.0, "triton_default": 0.0, "triton_best": 0.0}
    for name, (n, k, pro) in shapes.items():
        ws = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(L)]
        x = torch.randn(a.m, 2 * k if pro == "silu_mul" else k, device=dev, dtype=dt)
        r = torch.randn(a.m, k, device=dev, dtype=dt)
        nw = torch.rand(k, device=dev, dtype=dt) + 0.5
        xk = x[:, :k].contiguous()
        nbytes = n * k * 2

        def cublas():
            for w in ws:
                F.linear(xk, w)

        def cublas_pro():
            for w in ws:
                if pro == "norm":
                    hh, _ = ops.add_rms_norm(xk, r, nw, 1e-6)
                    F.linear(hh, w)
                elif pro == "silu_mul":
                    F.linear(ops.silu_and_mul(x), w)
                else:
                    F.linear(xk, w)

        def tri(cfg, pdl=None):
            def f():
                for w in ws:
                    if pro == "norm":
                        gemv(x, w, prologue="norm", residual=r, norm_w=nw, eps=1e-6, config=cfg, pdl=pdl)
                    else:
                        gemv(x, w, prologue=pro, config=cfg, pdl=pdl)
            return f

        res = {"N": n, "K": k, "weight_MB": nbytes / 1e6,
               "cublas_us": graph_us(cublas) / L, "cublas_with_prologue_us": graph_us(cublas_pro) / L}
        dcfg = default_config(n, k)
        res["triton_default"] = {"config": dcfg, "us": graph_us(tri(dcfg)) / L,
                                 "us_without_pdl": graph_us(tri(dcfg, pdl=False)) / L}
        sweep = []
        for bn, bk, nw_ in itertools.product((1, 2, 4, 8), (256, 512, 1024, 2048), (2, 4, 8)):
            if bk > max(256, triton_next_pow2(k)) or bn * bk > 16384 or bn * bk < 32 * nw_:
                continue
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw_}
            try:
                sweep.append((graph_us(tri(cfg)) / L, cfg))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print("  skip", cfg, type(e).__name__)
        sweep.sort(key=lambda t: t[0])
        res["triton_top5"] = [{"us": round(u, 2), "config": c} for u, c in sweep[:5]]
        best = sweep[0][0]
        for key, us in (("cublas", res["cublas_us"]), ("cublas_with_prologue", res["cublas_with_prologue_us"]),
                        ("triton_default", res["triton_default"]["us"]), ("triton_best", best)):
            tot[key] += us
        print(f"{name:26s} N={n:6d} K={k:5d} {nbytes / 1e6:5.1f} MB | cuBLAS {res['cublas_us']:6.2f} us "
              f"({nbytes / res['cublas_us'] / 1e3:5.0f} GB/s), +prologue {res['cublas_with_prologue_us']:6.2f} | "
              f"Triton default {res['triton_default']['us']:6.2f} "
              f"(no PDL {res['triton_default']['us_without_pdl']:6.2f}), "
              f"best {best:6.2f} us ({nbytes / best / 1e3:5.0f} GB/s) {sweep[0][1]}")
        for u, c in sweep[:5]:
            print(f"      {u:6.2f} us {c}")
        out["shapes"][name] = res
        ws = None                                    # free this shape's weights (the closures above hold the name)
        torch.cuda.empty_cache()
    out["per_layer_us"] = {k: round(v, 2) for k, v in tot.items()}
    out["per_step_us"] = {k: round(v * L, 1) for k, v in tot.items()}
    print("per layer (us):", out["per_layer_us"])
    print("per decode step (us):", out["per_step_us"])
    out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    p = Path(a.out or Path(__file__).resolve().parent / "results" / "gemv_cuda.json")
    p.write_text(json.dumps(out, indent=2))
    print("wrote", p)


def triton_next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


if __name__ == "__main__":
    main()
