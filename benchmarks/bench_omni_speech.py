"""Qwen2.5-Omni speech out, end to end: a text prompt in, ~200 codec tokens of speech out (4 s of audio at the
codec's 50 tokens per second), through the offline stage graph (``OmniLLM``'s pipeline: thinker -> talker ->
token2wav, the talker fed the thinker's states as they come, token2wav on chunks of codes, audio streamed
out chunk by chunk), against transformers' ``Qwen2_5OmniForConditionalGeneration.generate(..., return_audio=True)``
in the same run (concurrency 1: it runs one request at a time).

Per request: time to the first audio byte (the first pcm chunk leaving the pipeline), the time to its whole
utterance, the seconds of audio, and the real-time factor RTF = seconds of compute (wall time of the request)
per second of audio; at concurrency 1 and 16 (the requests submitted together, batched by every stage).
Goal (issue #26): first audio <= 150 ms and RTF <= 0.1 at concurrency 1 on one GPU.

Per token2wav chunk plan (``--first-chunk-frames``: ``ref``, Qwen's streaming plan, 72 mel frames with 24 of
look-ahead, and first chunks of N mel frames with ``--first-lookahead-frames``; one token2wav stage and pipeline
each, the thinker and talker shared), where the first audio waits: the mean time from the request to the
thinker's first token, the talker's first code, the code that makes token2wav's first window computable, that
window handed to the DiT engine, its mel done, and the first pcm out (benchmarks/speech_timing.py);
``stall_ms``, the time a player starting at the first audio waits for later pieces; and ``smooth_start_ms``, the
earliest start from which a player plays the whole utterance without waiting (a small first chunk brings the
first byte early, not this). Per request in the JSON.

The model: ``shape:qwen2.5-omni-7b`` (the 7B checkpoint's dimensions, random bf16 weights, built once into
the cache folder, ~22 GB; the talker's codec head rows of its special tokens are zero so that it speaks
real codes for as long as asked). The thinker answers ``--text-tokens`` tokens (EOS ignored); the talker
makes ``--codes`` codes (EOS ignored): after the thinker's reply it goes on on the text-pad row, as the
reference does. Sampling: the reference's defaults (the talker's top-k 40, top-p 0.8, temperature 0.9,
repetition penalty 1.05), seeded. (The tiny checkpoint's random talker samples its stop tokens: its
utterances end early; the columns say how many codes and seconds of audio each engine made.)

    python benchmarks/bench_omni_speech.py                 # GPU: 7B shape, concurrency 1 and 16, vs transformers
    python benchmarks/bench_omni_speech.py --tiny          # CPU smoke run: tiny:qwen2.5-omni, few tokens
    python benchmarks/bench_omni_speech.py --first-chunk-frames ref 24 48 --concurrency 1 --no-transformers
    python benchmarks/bench_omni_speech.py --first-chunk-frames 24 --concurrency 1 --no-transformers --timeline
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name, sync, table, write_result  # noqa: E402
from benchmarks.speech_timing import FirstEvents, playback_stall, smooth_start  # noqa: E402
from benchmarks.speech_trace import EngineTrace  # noqa: E402

CODEC_HZ = 50                       # Qwen2.5-Omni codec tokens per second of audio
VOICE = "Chelsie"
PROMPT = "Tell me a short story about a lighthouse keeper who finds a message in a bottle."
MARKS = ("thinker_first_token", "talker_first_code", "first_window_codes", "first_window_ready", "first_window_mel")
LAST = ("thinker_last_token", "talker_last_code")


def omni_config(path: str, gpu: bool, concurrency: int, max_len: int, talker_len: int, plans: list,
                lookahead: int, precision: str = "fp32", thinker_core: str = "off", t2w_compile: bool = False,
                streams: bool = False, fused: bool = True, t2w_priority: str = "normal",
                talker_priority: str = "normal", t2w_hold: float | None = None, first_alone: bool = False,
                ar_sms: int | None = None, t2w_sms: int | None = None, thinker_decode_steps: int | None = None,
                talker_decode_steps: int | None = None) -> dict:
    """The thinker and talker stages on one checkpoint, a token2wav stage per chunk plan (``plans``: None, the
    reference's, or the first chunk's mel frames) and a graph pipeline through each (``speech-<plan>``). On
    the GPU the KV caches are sized for ``concurrency`` requests (not a share of the GPU's memory: the stages
    and transformers' model share the card)."""
    ar = {"device": "cuda" if gpu else "cpu", "enforce_eager": not gpu, "cuda_stream": streams,
          "cuda_stream_sms": ar_sms}

    def sized(n_len: int) -> dict:
        if not gpu:
            return {}
        block = 256
        return {"cache": {"num_blocks": concurrency * -(-n_len // block) + 8, "block_size": block},
                "scheduler": {"max_num_seqs": max(32, concurrency), "max_model_len": n_len}}

    def steps(n: int | None) -> dict:
        return {} if n is None else {"decode_steps": n}

    stages = {
        "thinker": {"kind": "ar", "engine": {"model": {"path": path}, "core_process": thinker_core} | ar
                    | sized(max_len) | steps(thinker_decode_steps)},
        "talker": {"kind": "ar", "engine": {"model": {"path": path, "submodel": "talker"},
                                            "cuda_stream_priority": talker_priority} | ar | sized(talker_len)
                   | steps(talker_decode_steps)},
    }
    pipelines = {}
    for plan in plans:
        stream = {} if plan is None else {"token2wav_stream": {"first_chunk_frames": plan,
                                                               "first_lookahead_frames": lookahead}}
        stages[f"t2w-{label(plan)}"] = {"kind": "dit", "engine": {"model": {"path": path}, "device": ar["device"],
                                                                  "token2wav_precision": precision,
                                                                  "compile": t2w_compile, "cuda_stream": streams,
                                                                  "token2wav_fused_forward": fused,
                                                                  "cuda_stream_priority": t2w_priority,
                                                                  "cuda_stream_sms": t2w_sms,
                                                                  "token2wav_hold_s": t2w_hold,
                                                                  "token2wav_first_window_alone": first_alone}
                                                                 | stream}
        graph = {"model": "thinker", "stages": {"talker": "talker", "token2wav": f"t2w-{label(plan)}"}}
        pipelines[f"speech-{label(plan)}"] = {"graph": graph}
    return {"stages": stages, "pipelines": pipelines}


def label(plan: int | None) -> str:
    return "ref" if plan is None else str(plan)


def _messages(i: int | None = None) -> list[dict]:
    return [{"role": "user", "content": PROMPT if i is None else f"{PROMPT} ({i})"}]


async def _one(pipe, backends, kinds, args, messages: list[dict], marks: FirstEvents) -> dict:
    """One speech request through the pipeline's events: first audio chunk, end, audio seconds, codes, and
    the first events of its stages (ms from the request)."""
    from omni_ray.runner import run_pipeline

    rid = f"bench-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    first, audio, stages, pieces = None, None, None, []
    async for ev in run_pipeline(pipe, backends, kinds, None, rid, args, messages=messages, audio={"voice": VOICE}):
        if ev["type"] == "audio" and len(ev["pcm"]):
            pieces.append((time.perf_counter(), len(ev["pcm"]) / ev["sample_rate"]))
            first = first or pieces[0][0] - t0
        elif ev["type"] == "result":
            audio, stages = ev["audio"], ev["stages"]
    total = time.perf_counter() - t0
    seconds = len(audio["samples"]) / audio["sample_rate"]
    got = marks.of(rid)
    chunks = [dict(chunk=c, ready_ms=1e3 * (r - t0), mel_ms=1e3 * (m - t0), out_ms=1e3 * (o - t0))
              for c, r, m, o in marks.chunks.get(rid, [])]       # token2wav's windows: computable, mel, audio out
    return dict(first_audio_ms=1e3 * first, total_s=total, audio_s=seconds, rtf=total / seconds,
                codes=stages[1].get("num_codes"), text_tokens=stages[0].get("num_output_tokens"),
                stall_ms=1e3 * playback_stall(pieces[0][0], pieces),
                smooth_start_ms=1e3 * (smooth_start(pieces) - t0), pieces=len(pieces),
                **{f"{k}_ms": 1e3 * (got[k] - t0) if k in got else None for k in MARKS + LAST}, chunks=chunks)


def run_omni_ray(llm, n: int, text_tokens: int, codes: int, seed: int, pipeline: str, trace=None) -> dict:
    """``n`` requests at once (the pipeline's own coroutine per request, on the OmniLLM's engine loop, as
    ``OmniLLM.generate`` runs them, but watching each request's events for its first audio chunk)."""
    from omni_ray.runner import StageArgs

    args = StageArgs.from_kwargs(dict(max_tokens=text_tokens, ignore_eos=True, seed=seed,
                                      stage_args={"talker": {"max_tokens": codes, "ignore_eos": True}}))
    pipe, kinds = llm.config.pipelines[pipeline], llm._kinds()
    args.validate(pipeline, pipe, kinds)
    marks = FirstEvents()
    backends = marks.wrap({s.stage: llm._backend(s.stage) for s in pipe.steps}, [s.stage for s in pipe.steps])

    async def burst():
        return await asyncio.gather(*(_one(pipe, backends, kinds, args, _messages(i), marks) for i in range(n)))

    sync()
    t0 = time.perf_counter()
    reqs = llm._run(burst())
    wall = time.perf_counter() - t0
    ttfa = sorted(r["first_audio_ms"] for r in reqs)
    audio = sum(r["audio_s"] for r in reqs)
    mean = {f"{k}_ms": _mean([r[f"{k}_ms"] for r in reqs]) for k in MARKS}
    out = dict(first_audio_ms=statistics.mean(ttfa), first_audio_p90_ms=ttfa[math.ceil(0.9 * len(ttfa)) - 1],
               rtf=statistics.mean(r["rtf"] for r in reqs), audio_s=audio / n, codes=reqs[0]["codes"],
               text_tokens=reqs[0]["text_tokens"], wall_s=wall, audio_s_per_s=audio / wall,
               stall_ms=statistics.mean(r["stall_ms"] for r in reqs),
               smooth_start_ms=statistics.mean(r["smooth_start_ms"] for r in reqs), **mean, requests=reqs)
    if trace is not None:                              # what each engine did during the burst
        out["timeline"] = trace.summary(t0, t0 + wall)
    return out


def kernel_trace(llm, n: int, text_tokens: int, codes: int, seed: int, pipeline: str, path: str) -> None:
    """One more burst under torch.profiler (device kernels only): the chrome trace to ``path`` and, per CUDA
    stream, its kernels beside the other streams' and alone (which engine a stream is shows in its first /
    last kernel: the thinker's stream stops at its last token)."""
    import gzip
    import json

    from torch.profiler import ProfilerActivity, profile

    from benchmarks.stream_overlap import overlap_table

    acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        run_omni_ray(llm, n, text_tokens, codes, seed, pipeline)
    raw = Path(path).with_suffix(".tmp.json")
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    raw.unlink()
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    print(f"kernel trace of {n} request(s): {path}")
    print(table(overlap_table(trace), ["stream", "kernels", "device_ms", "first_ms", "last_ms", "beside",
                                       "beside_mean_us", "alone", "alone_mean_us"]))


def print_timeline(row: dict) -> None:
    """Where the first request of a run spent its time: the stages' last outputs, each token2wav window
    (computable, mel done, audio out), each engine's steps, the DiT steps and vocoder batches one by one."""
    req = row["requests"][0]
    print(f"timeline (first chunk {row['first_chunk']}, concurrency {row['concurrency']}, request 0, ms from its "
          f"start): thinker's last token {req['thinker_last_token_ms']:.0f}, talker's last code "
          f"{req['talker_last_code_ms']:.0f}, done {1e3 * req['total_s']:.0f}")
    print(table(req["chunks"], ["chunk", "ready_ms", "mel_ms", "out_ms"]))
    tl = row["timeline"]
    print(table([dict(engine=k, **v) for k, v in tl["engines"].items()],
                ["engine", "steps", "busy_ms", "first_ms", "last_end_ms", "p50_ms", "p90_ms", "max_ms",
                 "gpu_busy_ms", "gpu_p50_ms", "gpu_p90_ms", "gap_p50_ms"]))
    print(table(tl["dit_and_vocoder"][:40], ["engine", "start_ms", "ms", "items"]))
    if tl.get("talker_after_thinker"):
        print("talker steps after the thinker's last step:")
        print(table([tl["talker_after_thinker"]], ["steps", "codes", "span_ms", "ms_per_code", "busy_ms", "gpu_busy_ms",
                                                   "gap_ms", "solo_steps", "solo_ms_per_code", "beside_ms_per_code"]))


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def run_transformers(model, tokenizer, text_tokens: int, codes: int, seed: int) -> dict:
    """transformers' whole pipeline on one request (no streaming: the first audio byte is the whole
    waveform), the same lengths: thinker ``text_tokens`` (EOS held off), talker ``codes``."""
    text = tokenizer.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text)["input_ids"]], device=model.device)
    torch.manual_seed(seed)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        # audio out is generate's default for a checkpoint with a talker (``return_audio`` / ``generation_mode``:
        # the keyword's name changed across transformers 5.x)
        _, wav = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), speaker=VOICE,
                                thinker_max_new_tokens=text_tokens, thinker_min_new_tokens=text_tokens,
                                talker_max_new_tokens=codes, talker_min_new_tokens=codes)
    sync()
    total = time.perf_counter() - t0
    seconds = wav.reshape(-1).shape[0] / 24000
    return dict(first_audio_ms=1e3 * total, first_audio_p90_ms=1e3 * total, smooth_start_ms=1e3 * total,
                rtf=total / seconds, audio_s=seconds,
                codes=codes, text_tokens=text_tokens, wall_s=total, audio_s_per_s=seconds / total)


COLUMNS = ["engine", "first_chunk", "concurrency", "first_audio_ms", "first_audio_p90_ms", "stall_ms",
           "smooth_start_ms", "rtf", "audio_s", "wall_s", "audio_s_per_s", "codes", "text_tokens"]
BREAKDOWN = ["first_chunk", "concurrency"] + [f"{k}_ms" for k in MARKS] + ["first_audio_ms", "stall_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny:qwen2.5-omni on the CPU, few tokens (a smoke run)")
    ap.add_argument("--model", default=None, help="checkpoint (default: shape:qwen2.5-omni-7b, or the tiny one)")
    ap.add_argument("--text-tokens", type=int, default=None, help="thinker reply tokens (default 48; tiny 6)")
    ap.add_argument("--codes", type=int, default=None, help="codec tokens per request (default 200; tiny 60)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 16 (tiny: 1 2)")
    ap.add_argument("--first-chunk-frames", nargs="+", default=["ref", "24"], metavar="N",
                    help="token2wav chunk plans, a row each: ref (Qwen's streaming plan) or the first chunk's mel "
                         "frames (default: ref 24)")
    ap.add_argument("--first-lookahead-frames", type=int, default=0, help="the first chunks' look-ahead (default 0)")
    ap.add_argument("--token2wav-precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                    help="token2wav's DiT matmuls (fp32: the reference's)")
    ap.add_argument("--token2wav-compile", action="store_true",
                    help="torch.compile token2wav's DiT blocks (fused elementwise kernels inside its CUDA graphs)")
    ap.add_argument("--token2wav-layered", action="store_true",
                    help="token2wav's DiT layer by layer as transformers runs it (token2wav_fused_forward: false)")
    ap.add_argument("--engine-streams", action="store_true",
                    help="each engine's device work on a CUDA stream of its own (the engines' cuda_stream)")
    ap.add_argument("--token2wav-high-priority", action="store_true",
                    help="with --engine-streams: token2wav's stream at the highest priority (cuda_stream_priority)")
    ap.add_argument("--talker-high-priority", action="store_true",
                    help="with --engine-streams: the talker's stream at the highest priority (cuda_stream_priority)")
    ap.add_argument("--first-window-alone", action="store_true",
                    help="token2wav_first_window_alone: a stream's first window's ODE with the AR engines' steps held")
    ap.add_argument("--token2wav-hold", type=float, default=None, metavar="S",
                    help="token2wav_hold_s: windows after the first wait until the audio sent would play out within "
                         "S seconds or all codes are in (then start together)")
    ap.add_argument("--ar-sms", type=int, default=None,
                    help="with --engine-streams: the thinker's and talker's streams on a green context of this many "
                         "SMs (cuda_stream_sms), the rest of the GPU left to token2wav's window kernels")
    ap.add_argument("--t2w-sms", type=int, default=None,
                    help="with --engine-streams: token2wav's stream (and its graphs) on the GPU's last N SMs "
                         "(cuda_stream_sms; with --ar-sms total - N, the two groups are disjoint)")
    ap.add_argument("--thinker-decode-steps", type=int, default=None,
                    help="the thinker's decode_steps (default: the engine's, 4): its tokens' states reach the talker "
                         "a run at a time")
    ap.add_argument("--talker-decode-steps", type=int, default=None, help="the talker's decode_steps")
    ap.add_argument("--thinker-core-process", choices=["off", "on"], default="off",
                    help="step the thinker's engine in a child process (its own interpreter, not a thread of "
                         "this one; the talker's core stays a thread: fed rows go straight into its requests)")
    ap.add_argument("--timeline-gpu", action="store_true",
                    help="with --timeline: CUDA events around each engine step (device time per step; they slow "
                         "the run they measure: benchmarks/speech_trace.py)")
    ap.add_argument("--kernel-trace", default=None, metavar="PATH",
                    help="after the timed rows, one more run of the first plan and concurrency under torch.profiler: "
                         "its chrome trace to PATH (.json.gz) and each CUDA stream's kernels beside / without the "
                         "others' (benchmarks/stream_overlap.py)")
    ap.add_argument("--timeline", action="store_true",
                    help="trace every engine step and vocoder batch (benchmarks/speech_trace.py) and print where one "
                         "request's time goes (the first concurrency level's run)")
    ap.add_argument("--switch-interval", type=float, default=None, metavar="MS",
                    help="the interpreter's thread switch interval (sys.setswitchinterval; Python's default 5 ms): "
                         "the engines' threads and the event loop share one interpreter here")
    ap.add_argument("--cuda-connections", type=int, default=None, metavar="N",
                    help="CUDA_DEVICE_MAX_CONNECTIONS (the driver's default 8 hardware queues, which streams share "
                         "round-robin: the engines' streams may land on one and serialize)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cuda_connections is not None:          # read when the CUDA context is made: before any CUDA call
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = str(args.cuda_connections)
    gpu = torch.cuda.is_available() and not args.tiny
    text_tokens = args.text_tokens or (6 if args.tiny else 48)
    codes = args.codes or (60 if args.tiny else 200)
    levels = args.concurrency or ([1, 2] if args.tiny else [1, 16])
    plans = [None if f == "ref" else int(f) for f in args.first_chunk_frames]

    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval / 1e3)
    from omni_ray.offline import OmniLLM
    from omni_ray.testing import resolve_model

    path = str(resolve_model(args.model or ("tiny:qwen2.5-omni" if args.tiny else "shape:qwen2.5-omni-7b")))
    t_build = time.perf_counter()
    llm = OmniLLM(omni_config(path, gpu, max(levels), max_len=1024, talker_len=1024 + codes, plans=plans,
                              lookahead=args.first_lookahead_frames, precision=args.token2wav_precision,
                              thinker_core=args.thinker_core_process, t2w_compile=args.token2wav_compile,
                              streams=args.engine_streams, fused=not args.token2wav_layered,
                              t2w_priority="high" if args.token2wav_high_priority else "normal",
                              talker_priority="high" if args.talker_high_priority else "normal",
                              t2w_hold=args.token2wav_hold, first_alone=args.first_window_alone,
                              ar_sms=args.ar_sms, t2w_sms=args.t2w_sms, thinker_decode_steps=args.thinker_decode_steps,
                              talker_decode_steps=args.talker_decode_steps))
    for plan in plans:                                               # builds and warms the engines (a short one)
        run_omni_ray(llm, 1, 4, 2 * CODEC_HZ // 5, args.seed, f"speech-{label(plan)}")
    print(f"engines up and warm in {time.perf_counter() - t_build:.1f} s")
    rows = []
    with EngineTrace(args.timeline_gpu) if args.timeline else contextlib.nullcontext() as trace:
        for plan in plans:
            for c in levels:
                pipe = f"speech-{label(plan)}"
                run_omni_ray(llm, c, text_tokens, codes, args.seed + 1, pipe)     # the batch sizes' first run: warm-up
                rows.append(dict(engine="omni-ray", first_chunk=label(plan), concurrency=c,
                                 **run_omni_ray(llm, c, text_tokens, codes, args.seed, pipe, trace)))
                print(table(rows[-1:], COLUMNS))
                if "timeline" in rows[-1]:
                    print_timeline(rows[-1])
    if args.kernel_trace:
        kernel_trace(llm, levels[0], text_tokens, codes, args.seed, f"speech-{label(plans[0])}", args.kernel_trace)
    stats = {k: v for k, v in llm.stats().items() if isinstance(v, dict)}
    llm.shutdown()
    if not args.no_transformers:
        from transformers import AutoTokenizer, Qwen2_5OmniForConditionalGeneration

        dtype = torch.bfloat16 if gpu else torch.float32
        hf = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=dtype).to("cuda" if gpu else "cpu").eval()
        tok = AutoTokenizer.from_pretrained(path)
        run_transformers(hf, tok, 2, 8, args.seed)                   # warm-up
        rows.append(dict(engine="transformers", first_chunk="", concurrency=1,
                         **run_transformers(hf, tok, text_tokens, codes, args.seed)))
    print(f"Qwen2.5-Omni speech ({'tiny' if args.tiny else '7B shape'}), {device_name() if gpu else 'cpu'}, "
          f"thinker {text_tokens} tokens, talker {codes} codes ({codes / CODEC_HZ:.1f} s of audio) per request; "
          f"first chunks' look-ahead {args.first_lookahead_frames} mel frames")
    print(table(rows, COLUMNS))
    print("where the first audio waits (mean ms from the request):")
    print(table([r for r in rows if r["engine"] == "omni-ray"], BREAKDOWN))
    name = f"omni_speech_{'cuda' if gpu else 'cpu_quick'}.json"
    print(write_result(name, dict(args=vars(args), model=path, rows=rows, stage_stats=stats)))


if __name__ == "__main__":
    main()
