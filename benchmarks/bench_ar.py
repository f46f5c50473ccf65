"""AR engine throughput and latency against HF transformers, with the memory-bandwidth ceiling.

    python benchmarks/bench_ar.py                       # GPU: Qwen3-0.6B shape, random weights
    python benchmarks/bench_ar.py --quick               # CPU smoke run on a tiny checkpoint

Ceiling: every decode step reads the weights once and each sequence's KV cache once, so
    ceiling_time = sum over steps (weight_bytes) + sum over decode rows (context * kv_bytes_per_token)
                   ---------------------------------------------------------------------------
                                    device copy bandwidth (measured in this run)
and ratio = ceiling_time / measured_time (1.0 = at the roofline).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, copy_bandwidth, table, write_result  # noqa: E402
from omni_ray.ar import LLM, SamplingParams  # noqa: E402
from omni_ray.testing import resolve_model  # noqa: E402


def hf_generate(path, batch: int, prompt_len: int, new: int, vocab: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    ids = torch.randint(0, vocab, (batch, prompt_len), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    model.generate(ids[:, :16], **kw | dict(max_new_tokens=4, min_new_tokens=4))   # warm up
    with Timer() as t:
        model.generate(ids, **kw)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return batch * new / t.s


def run_engine(llm, prompts, params, bw: float) -> dict:
    st = llm.stats
    s0, d0, c0 = st.forwards, st.decode_tokens, st.decode_context_tokens
    with Timer() as t:
        outs = llm.generate(prompts, params, use_tqdm=False)
    n_out = sum(len(o["token_ids"]) for o in outs)
    steps, ctx = st.forwards - s0, st.decode_context_tokens - c0    # device forwards: weights read once each
    w = sum(p.numel() * p.element_size() for p in llm.runner.model.parameters())
    kv_tok = llm.runner.block_bytes / llm.runner.block_size
    ceiling_s = (steps * w + ctx * kv_tok) / bw
    return {"output_tokens": n_out, "seconds": t.s, "tok_per_s": n_out / t.s, "steps": steps,
            "ceiling_tok_per_s": n_out / ceiling_s, "ratio_to_ceiling": ceiling_s / t.s,
            "decode_tokens": st.decode_tokens - d0}


def profile_decode(llm, prompt, ignore) -> None:
    """Where a batch-1 decode step's time goes: the graph on the GPU vs the host around it."""
    import time

    from torch.profiler import ProfilerActivity, profile
    llm.add_request(prompt, SamplingParams(max_tokens=400, **ignore), "prof")
    for _ in range(10):
        llm.step()
    torch.cuda.synchronize()
    f0 = llm.stats.forwards
    t0 = time.perf_counter()
    for _ in range(40):
        llm.step()
    step_ms = (time.perf_counter() - t0) / (llm.stats.forwards - f0) * 1e3
    g = llm.runner.graphs[1]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        llm.runner.g_step.zero_()          # the graph writes its token at g_step (< decode_steps)
        g.replay()
    torch.cuda.synchronize()
    graph_ms = (time.perf_counter() - t0) / 50 * 1e3
    print(f"batch-1 decode: engine {step_ms:.3f} ms per token (decode_steps={llm.config.decode_steps}), "
          f"graph replay alone {graph_ms:.3f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            llm.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    # the kernels of one decode forward, eager (the same launches the graph replays), per forward
    r = llm.runner
    meta = r._decode_meta(1, r._splits(1, r.max_model_len))
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            r.g_step.zero_()
            r._decode_body(1, meta)
        torch.cuda.synchronize()
    try:
        kern: dict[str, list[float]] = {}
        for e in prof.events():
            if getattr(e.device_type, "name", "") == "CUDA":
                t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                kern.setdefault(e.name, []).append(t)
        total = sum(sum(v) for v in kern.values()) / 10
        print(f"one eager decode forward: {sum(len(v) for v in kern.values()) / 10:.0f} kernels, "
              f"{total:.0f} us of kernel time")
        for name, v in sorted(kern.items(), key=lambda kv: -sum(kv[1]))[:20]:
            print(f"  {len(v) / 10:6.1f} x {sum(v) / len(v):7.2f} us  {name[:90]}")
    except Exception as e:  # the breakdown is informative only
        print("kernel breakdown unavailable:", e)
    llm.abort("prof")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shape:qwen3-0.6b")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on tiny:qwen3")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile batch-1 decode steps")
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="greedy decode steps per schedule (engine default if unset)")
    ap.add_argument("--small-gemv", choices=["auto", "on", "off"], default=None,
                    help="fused Triton GEMVs for decode batches <= 4 (engine default: auto, timed at start-up)")
    ap.add_argument("--decode-merge", choices=["kernel", "launch"], default=None,
                    help="split merge of the decode attention: in-kernel or a second launch (engine default: launch)")
    ap.add_argument("--async-decode", choices=["on", "off"], default=None,
                    help="queue each decode run of an unchanged batch before the previous one is read "
                         "(engine async_decode; default: on)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample every request at this temperature (unseeded; default 0: greedy)")
    ap.add_argument("--out", default=None, help="result file name under benchmarks/results/ (default ar_<device>.json)")
    ap.add_argument("--repeat", type=int, default=3, help="batch-1 runs (the median is reported)")
    ap.add_argument("--only-batch1", action="store_true", help="stop after the batch-1 figure (and --profile)")
    ap.add_argument("--compare-single-step", action="store_true",
                    help="also run batch-1 decode with decode_steps=1 (the per-step host cost, unhidden)")
    args = ap.parse_args()
    if args.quick:
        args.model, args.num_seqs, args.min_len, args.max_len, args.skip_hf = "tiny:qwen3", 8, 8, 32, True
    cuda = torch.cuda.is_available()
    path = resolve_model(args.model)
    bw = copy_bandwidth() if cuda else 20e9
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s")
    res = {"model": args.model, "copy_bandwidth_Bps": bw}
    rows = []

    fixed = (64, 256, 256) if not args.quick else (4, 16, 16)
    b1 = (128, 256) if not args.quick else (16, 16)
    extra = {} if cuda else {"num_kvcache_blocks": 512, "kvcache_block_size": 16}
    if args.decode_steps:
        extra["decode_steps"] = args.decode_steps
    if args.small_gemv:
        extra["small_gemv"] = args.small_gemv
    if args.decode_merge:
        extra["decode_merge"] = args.decode_merge
    if args.async_decode:
        extra["async_decode"] = args.async_decode == "on"
    llm = LLM(str(path), max_model_len=4096, enforce_eager=args.enforce_eager or not cuda,
              device="cuda" if cuda else "cpu", **extra)
    res["decode_steps"] = llm.config.decode_steps
    res["decode_merge"] = llm.config.decode_merge
    res["async_decode"] = llm.config.async_decode
    res["small_gemv"] = getattr(llm.runner, "gemv_timing", None)
    print("batch-1 projections:", res["small_gemv"], flush=True)
    vocab = llm.arch.vocab_size
    rng = random.Random(0)
    ignore = dict(temperature=args.temperature, ignore_eos=True)
    res["temperature"] = args.temperature
    # warm up (compile, autotune)
    llm.generate([[rng.randrange(vocab) for _ in range(32)]] * 2, SamplingParams(max_tokens=8, **ignore),
                 use_tqdm=False)

    # 1) batch-1 decode
    prompt = [[rng.randrange(vocab) for _ in range(b1[0])]]
    runs = [run_engine(llm, prompt, SamplingParams(max_tokens=b1[1], **ignore), bw) for _ in range(args.repeat)]
    r1 = sorted(runs, key=lambda r: r["tok_per_s"])[len(runs) // 2]            # the median run
    r1["runs_tok_per_s"] = [round(r["tok_per_s"], 1) for r in runs]
    res["batch1"] = r1
    rows.append({"figure": f"batch-1 decode ({b1[0]} prompt, {b1[1]} new)", "omni-ray tok/s": r1["tok_per_s"],
                 "HF tok/s": "", "ceiling tok/s": r1["ceiling_tok_per_s"],
                 "ratio to ceiling": r1["ratio_to_ceiling"]})

    print("batch-1:", {k: round(v, 4) if isinstance(v, float) else v for k, v in r1.items()}, flush=True)
    if args.compare_single_step:
        k = llm.config.decode_steps
        llm.config.decode_steps = 1
        r = run_engine(llm, prompt, SamplingParams(max_tokens=b1[1], **ignore), bw)
        llm.config.decode_steps = k
        res["batch1_single_step"] = r
        print("batch-1, decode_steps=1:", r["tok_per_s"], flush=True)
        rows.append({"figure": "batch-1 decode, decode_steps=1", "omni-ray tok/s": r["tok_per_s"], "HF tok/s": "",
                     "ceiling tok/s": r["ceiling_tok_per_s"], "ratio to ceiling": r["ratio_to_ceiling"]})

    if args.profile and cuda:
        profile_decode(llm, prompt[0], ignore)

    if args.only_batch1:
        print(f"batch-1 only: {r1['tok_per_s']:.0f} tok/s")
        return
    # 2) fixed shape, as the HF anchor
    prompts = [[rng.randrange(vocab) for _ in range(fixed[1])] for _ in range(fixed[0])]
    rf = run_engine(llm, prompts, SamplingParams(max_tokens=fixed[2], **ignore), bw)
    res["fixed"] = rf
    rows.append({"figure": f"batch {fixed[0]}, {fixed[1]} prompt, {fixed[2]} new", "omni-ray tok/s": rf["tok_per_s"],
                 "HF tok/s": "", "ceiling tok/s": rf["ceiling_tok_per_s"],
                 "ratio to ceiling": rf["ratio_to_ceiling"]})

    # 3) nano-vllm throughput shape
    prompts = [[rng.randrange(min(vocab, 10000)) for _ in range(rng.randint(args.min_len, args.max_len))]
               for _ in range(args.num_seqs)]
    params = [SamplingParams(max_tokens=rng.randint(args.min_len, args.max_len), **ignore)
              for _ in range(args.num_seqs)]
    rt = run_engine(llm, prompts, params, bw)
    res["throughput"] = rt
    res["engine_stats"] = llm.engine_stats()
    if not args.skip_hf and cuda:    # after omni-ray, its engine freed: HF in the same process slowed
        del llm                      # the batch-1 figure measured after it (~1,070 -> ~900 tok/s)
        gc.collect()
        torch.cuda.empty_cache()
        res["hf_batch1_tok_per_s"] = hf_generate(path, 1, b1[0], 64, vocab)
        res["hf_fixed_tok_per_s"] = hf_generate(path, fixed[0], fixed[1], fixed[2], vocab)
        print("HF:", res["hf_batch1_tok_per_s"], res["hf_fixed_tok_per_s"])
        rows[0]["HF tok/s"], rows[1]["HF tok/s"] = res["hf_batch1_tok_per_s"], res["hf_fixed_tok_per_s"]
    rows.append({"figure": f"nano-vllm shape ({args.num_seqs} seqs, {args.min_len}-{args.max_len})",
                 "omni-ray tok/s": rt["tok_per_s"], "HF tok/s": "", "ceiling tok/s": rt["ceiling_tok_per_s"],
                 "ratio to ceiling": rt["ratio_to_ceiling"]})
    out = write_result(args.out or f"ar_{'cuda' if cuda else 'cpu'}{'_quick' if args.quick else ''}.json", res)
    print(table(rows, ["figure", "omni-ray tok/s", "HF tok/s", "ceiling tok/s", "ratio to ceiling"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
