"""Tensor parallelism: the AR engine at TP=1 and TP=2 in the same run (each in its own process).

    python benchmarks/bench_tp.py                                   # 2 GPUs: Qwen3-8B shape, random bf16 weights
    python benchmarks/bench_tp.py --num-seqs 64                     # smaller throughput run
    python benchmarks/bench_tp.py --device cpu --model tiny:qwen3   # CPU smoke run (gloo, Ray actors)

Figures per TP size:
* batch-1 decode: a 128-token prompt, 256 new tokens (greedy, ignore_eos): tok/s and ms/token
  of the decode phase (after the first token), plus end-to-end tok/s;
* nano-vllm shape: 256 sequences, prompt and output lengths uniform in [100, 1024], ignore_eos;
* the device side of a batch-1 decode step alone (50 back-to-back forwards / graph replays on dummy
  rows, all ranks together): what is left of ms/token is host work per step;
* TP only: rank 0's host time per decode step spent handing the step to the workers (header post +
  input broadcast launch), measured around ``_Rank0Peers.decode``.
Ratio: TP=2 ms/token over TP=1 ms/token (target <= 0.65 on 2 H200s). Results:
``benchmarks/results/tp_{cuda,cpu}.json``. NCCL_NVLS_ENABLE=0 is set unless already set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")               # no NVLink multicast (shared hosts)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default shape:qwen3-8b (GPU) / tiny:qwen3 (CPU)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--tp", default="1,2", help="comma-separated TP sizes, each run in its own process")
    ap.add_argument("--num-seqs", type=int, default=None, help="throughput sequences (default 256; CPU 8)")
    ap.add_argument("--min-len", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None, help="batch-1 prompt (default 128; CPU 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="batch-1 new tokens (default 256; CPU 32)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--decode-steps", type=int, default=None, help="engine decode_steps (default: the engine's)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = args.device == "cpu"
    defaults = dict(model="tiny:qwen3" if cpu else "shape:qwen3-8b", num_seqs=8 if cpu else 256,
                    min_len=8 if cpu else 100, max_len=32 if cpu else 1024, prompt_len=16 if cpu else 128,
                    new_tokens=32 if cpu else 256)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- one TP size (child)
def make_llm(args, tp: int):
    from omni_ray.ar import LLM
    kw = dict(max_model_len=args.max_model_len, device=args.device, tensor_parallel_size=tp,
              enforce_eager=args.enforce_eager or args.device == "cpu")
    if args.device == "cpu":
        kw |= dict(num_kvcache_blocks=512, kvcache_block_size=16, max_num_batched_tokens=512)
    if args.decode_steps is not None:
        kw["decode_steps"] = args.decode_steps
    return LLM(args.model, **kw)


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch1(llm, args, rng) -> dict:
    """Prefill + first token, then the decode phase timed on its own."""
    from omni_ray.ar import SamplingParams
    vocab = llm.arch.vocab_size
    prompt = [rng.randrange(min(vocab, 10000)) for _ in range(args.prompt_len)]
    seq = llm.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True), "b1")
    sync()
    t0 = time.perf_counter()
    while seq.num_output_tokens == 0:
        llm.step()
    sync()
    t1 = time.perf_counter()
    first = seq.num_output_tokens
    while not llm.is_finished():
        llm.step()
    sync()
    t2 = time.perf_counter()
    decoded = seq.num_output_tokens - first
    return {"prompt_tokens": args.prompt_len, "new_tokens": seq.num_output_tokens,
            "prefill_and_first_s": t1 - t0, "decode_s": t2 - t1,
            "decode_ms_per_token": (t2 - t1) / decoded * 1e3, "decode_tok_per_s": decoded / (t2 - t1),
            "end_to_end_tok_per_s": seq.num_output_tokens / (t2 - t0)}


def throughput(llm, args, rng) -> dict:
    from omni_ray.ar import SamplingParams
    vocab = llm.arch.vocab_size
    n = args.num_seqs
    prompts = [[rng.randrange(min(vocab, 10000)) for _ in range(rng.randint(args.min_len, args.max_len))]
               for _ in range(n)]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=rng.randint(args.min_len, args.max_len))
              for _ in range(n)]
    s0 = llm.stats.steps
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    dt = time.perf_counter() - t0
    n_out = sum(len(o["token_ids"]) for o in outs)
    return {"num_seqs": n, "output_tokens": n_out, "seconds": dt, "tok_per_s": n_out / dt,
            "steps": llm.stats.steps - s0}


def time_handoff(llm) -> dict | None:
    """Wrap rank 0's per-step hand-off to the workers with a timer (TP runs only)."""
    peers = getattr(llm.runner.runner, "peers", None) if hasattr(llm.runner, "group") else None
    if peers is None:
        return None
    times: dict[str, list[float]] = {"decode": [], "forward": []}
    for name in times:
        orig = getattr(peers, name)

        def timed(*a, _orig=orig, _name=name, **kw):
            t = time.perf_counter()
            _orig(*a, **kw)
            times[_name].append(time.perf_counter() - t)
        setattr(peers, name, timed)
    return times


def child(args) -> None:
    import torch

    from omni_ray.testing import resolve_model
    tp = args.child
    args.model = str(resolve_model(args.model))      # builds shape:/tiny: checkpoints the first time
    if torch.cuda.is_available():
        torch.cuda.empty_cache()                      # a build on this GPU must not hold memory now
    if tp > 1:
        import ray
        ray.init(include_dashboard=False, log_to_driver=False,
                 num_cpus=max(4, os.cpu_count() or 4))
    res: dict = {"tp": tp}
    t = time.perf_counter()
    llm = make_llm(args, tp)
    res["startup_s"] = time.perf_counter() - t
    res["decode_steps"] = llm.config.decode_steps
    res["weight_bytes_rank0"] = sum(p.numel() * p.element_size() for p in llm.runner.model.parameters())
    res["num_kv_blocks"] = llm.runner.num_blocks
    res["cuda_graphs"] = len(llm.runner.graphs)
    rng = random.Random(0)
    from omni_ray.ar import SamplingParams
    llm.generate([[rng.randrange(100) for _ in range(32)]] * 2, SamplingParams(max_tokens=8, ignore_eos=True),
                 use_tqdm=False)                                             # warm up
    from omni_ray.ar.executor.tensor_parallel import time_decode_forwards
    if hasattr(llm.runner, "group"):         # every rank replays together
        fwd = llm.runner.group.call("time_decode_forwards", 1, 50)
    else:
        fwd = time_decode_forwards(llm.runner, 1, 50)
    res["decode_forward_ms_bs1"] = fwd * 1e3   # device side of one decode step (graph replay on GPU)
    timers = time_handoff(llm)
    res["batch1"] = batch1(llm, args, rng)
    if timers is not None and timers["decode"]:
        d = sorted(timers["decode"])
        res["handoff_us_per_decode_step_p50"] = d[len(d) // 2] * 1e6
        res["handoff_decode_steps"] = len(d)
    if not args.skip_throughput:
        res["throughput"] = throughput(llm, args, rng)
    if timers is not None and timers["forward"]:
        f = sorted(timers["forward"])
        res["handoff_us_per_eager_step_p50"] = f[len(f) // 2] * 1e6
    if torch.cuda.is_available() and args.device == "cuda":
        res["device"] = torch.cuda.get_device_name()
        res["peak_gib_rank0"] = torch.cuda.max_memory_allocated() / 2**30
    shutdown = getattr(llm, "shutdown", None)
    if shutdown:
        shutdown()
    Path(args.out).write_text(json.dumps(res))


# ----------------------------------------------------------------------------- parent
def run_child(argv: list[str], tp: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", str(tp), "--out", out]
    print(f"--- TP={tp}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        return {"tp": tp, "error": f"exit code {proc.returncode}"}
    try:
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def main():
    args = parse_args()
    if args.child:
        return child(args)
    from benchmarks.common import copy_bandwidth, table, write_result
    argv = [a for a in sys.argv[1:]]
    if "--device" not in argv:
        argv += ["--device", args.device]
    tps = [int(x) for x in args.tp.split(",") if x]
    res = {"model": args.model, "device_kind": args.device, "max_model_len": args.max_model_len,
           "copy_bandwidth_Bps": copy_bandwidth() if args.device == "cuda" else None,
           "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "CUDA_VISIBLE_DEVICES") if k in os.environ},
           "runs": {}}
    for tp in tps:
        res["runs"][str(tp)] = run_child(argv, tp)
    rows = []
    base = res["runs"].get("1", {}).get("batch1", {}).get("decode_ms_per_token")
    for tp in tps:
        r = res["runs"][str(tp)]
        if "error" in r:
            rows.append({"TP": tp, "batch-1 ms/token": r["error"]})
            continue
        b1, th = r["batch1"], r.get("throughput", {})
        ratio = b1["decode_ms_per_token"] / base if base else ""
        rows.append({"TP": tp, "batch-1 ms/token": b1["decode_ms_per_token"], "batch-1 tok/s": b1["decode_tok_per_s"],
                     "ratio to TP=1": ratio, "forward alone ms": r.get("decode_forward_ms_bs1", ""),
                     f"{args.num_seqs} seqs tok/s": th.get("tok_per_s", ""),
                     "hand-off us/step": r.get("handoff_us_per_decode_step_p50", "")})
        if tp != 1 and base:
            res[f"tp{tp}_over_tp1_ms_per_token"] = ratio
    out = write_result(f"tp_{args.device}.json", res)
    print(table(rows, ["TP", "batch-1 ms/token", "batch-1 tok/s", "ratio to TP=1", "forward alone ms",
                       f"{args.num_seqs} seqs tok/s", "hand-off us/step"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
