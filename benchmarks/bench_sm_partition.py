"""Does an SM partition keep a chain of small kernels fast while a memory-bound decode runs beside it?

The speech pipeline's token2wav window is ~800 small kernels in one CUDA graph (~50 ms alone on an
H100) and slows to ~200 ms while the thinker's and talker's decode kernels, which spread over every SM,
run on other streams; stream priority does not help (a running block is never preempted). Here, with
stand-ins for both (a graph of GEMVs over 2.3 GB of weights; a graph of 2,400 small matmul + GELU
kernels), the small chain is timed alone, beside the decode on a normal stream, and beside the decode on
a green context's stream of ``--sms`` SMs (``cuda_stream_sms``; its graph captured on that stream, or
captured normally and replayed there), then with the chain on the other SMs only (token2wav's
``cuda_stream_sms`` on the GPU's last SMs: a disjoint split), and the decode's bandwidth in each case.

    python benchmarks/bench_sm_partition.py --sms 100 116 124
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import table, write_result  # noqa: E402
from omni_ray.devices import green_stream  # noqa: E402


def graph(fn, stream=None):
    s = stream or torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        fn()
    torch.cuda.synchronize()
    return g


def timed(stream, g, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
    return start, end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sms", type=int, nargs="+", default=[100, 116, 124])
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sm_partition needs a CUDA GPU")
    dev = torch.device("cuda")
    bf = torch.bfloat16
    weights = [torch.randn(14336, 4096, device=dev, dtype=bf) for _ in range(4)]      # 4 x 117 MB
    x = torch.randn(4, 4096, device=dev, dtype=bf)
    wbytes = sum(w.numel() * 2 for w in weights) * 5

    def decode():
        for _ in range(5):
            for w in weights:
                torch.matmul(x, w.t())

    h = torch.randn(96, 1024, device=dev, dtype=bf)
    ws = [torch.randn(1024, 1024, device=dev, dtype=bf) * 0.03 for _ in range(22)]

    def ode():
        y = h
        for _ in range(36):
            for w in ws:
                y = torch.nn.functional.gelu(y @ w)
        return y

    g_ode = graph(ode)
    side = torch.cuda.Stream()
    s_ode, e_ode = timed(side, g_ode, 5)
    torch.cuda.synchronize()
    alone_ms = s_ode.elapsed_time(e_ode) / 5
    rows = [{"case": "small chain alone", "chain_ms": alone_ms}]

    def beside(dec_stream, g_dec, label):
        reps_dec = 400
        s_d, e_d = timed(dec_stream, g_dec, reps_dec)                 # queued first: runs throughout
        s_o, e_o = timed(side, g_ode, 5)
        torch.cuda.synchronize()
        dec_ms = s_d.elapsed_time(e_d) / reps_dec
        rows.append({"case": label, "chain_ms": s_o.elapsed_time(e_o) / 5, "decode_ms": dec_ms,
                     "decode_gb_s": wbytes / dec_ms / 1e6})

    normal = torch.cuda.Stream()
    g_dec = graph(decode)
    s_d, e_d = timed(normal, g_dec, 50)
    torch.cuda.synchronize()
    rows.append({"case": "decode alone", "decode_ms": s_d.elapsed_time(e_d) / 50,
                 "decode_gb_s": wbytes / (s_d.elapsed_time(e_d) / 50) / 1e6})
    beside(normal, g_dec, "beside decode, normal stream")
    for n in a.sms:
        try:
            gs = green_stream(dev, n)
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            rows.append({"case": f"green {n} SMs: {err!r}"[:120]})
            continue
        g_green = graph(decode, stream=gs)
        beside(gs, g_green, f"beside decode on {n} SMs (captured there)")
        beside(gs, g_dec, f"beside decode on {n} SMs (captured normally)")
        rest = torch.cuda.get_device_properties(dev).multi_processor_count - n
        last = green_stream(dev, rest, "last")                        # the chain on the other SMs only
        g_ode_last = graph(ode, stream=last)
        s_o, e_o = timed(last, g_ode_last, 5)
        torch.cuda.synchronize()
        rows.append({"case": f"chain alone on the last {rest} SMs", "chain_ms": s_o.elapsed_time(e_o) / 5})
        s_d, e_d = timed(gs, g_green, 400)
        s_o, e_o = timed(last, g_ode_last, 5)
        torch.cuda.synchronize()
        dec_ms = s_d.elapsed_time(e_d) / 400
        rows.append({"case": f"chain on the last {rest} SMs beside decode on the first {n}",
                     "chain_ms": s_o.elapsed_time(e_o) / 5, "decode_ms": dec_ms, "decode_gb_s": wbytes / dec_ms / 1e6})
    print(table(rows, ["case", "chain_ms", "decode_ms", "decode_gb_s"]))
    print(write_result("sm_partition_cuda.json", {"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
