"""Qwen2.5-Omni speech out end to end (thinker -> talker -> token2wav through ``OmniLLM``, the same runner as the
Serve app) vs transformers' ``Qwen2_5OmniForConditionalGeneration.generate(return_audio=True)`` in the same run.

The model is ``shape:qwen2.5-omni-7b`` (Qwen2.5-Omni-7B's dimensions, random bf16 weights, token2wav in float32
as the model runs it). A text prompt in, ``--thinker-tokens`` text tokens and ``--codes`` codec tokens out
(200 codes = 4 s of audio; the end tokens ignored so that every request has that length). Per concurrency
(all requests at once): time to the first audio chunk (the streamed runner's ``audio`` event; transformers has
no streaming, its first audio is its whole call), and the real-time factor (seconds of wall time per second of
audio: per request, and for the batch as a whole). Anchor (issue #26): vLLM-Omni, Qwen3-Omni on 2x H100, RTF
0.118 at concurrency 1; goal on one GPU: first audio <= 150 ms, RTF <= 0.1 at concurrency 1.

    python benchmarks/bench_speech.py                                   # GPU: 7B shape, concurrency 1 and 16
    python benchmarks/bench_speech.py --tiny --codes 60 --concurrency 1 2 --steps 3      # CPU smoke run
Results: benchmarks/results/speech_<cuda|cpu>[_tiny].json. With ``--codes`` the talker ignores its end tokens
(omni-ray drops any it samples, so its audio may be a little shorter; the RTF is per second of audio).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name, table, write_result  # noqa: E402

PROMPT = "Tell me a short story about a lighthouse keeper and the sea."


def omni_config(path: str, device: str, blocks: int) -> dict:
    ar = {"device": device, "cache": {"num_blocks": blocks}, "scheduler": {"max_num_seqs": 32, "max_model_len": 4096}}
    ar |= {"enforce_eager": True} if device == "cpu" else {}
    return {"stages": {"thinker": {"kind": "ar", "engine": {"model": {"path": path}} | ar},
                       "talker": {"kind": "ar", "engine": {"model": {"path": path, "submodel": "talker"}} | ar},
                       "token2wav": {"kind": "dit", "engine": {"model": {"path": path}, "device": device,
                                                                "max_batch_size": 64}}},
            "pipelines": {"omni": {"graph": {"model": "thinker",
                                             "stages": {"talker": "talker", "token2wav": "token2wav"}}}}}


async def one_request(omni, args, i: int) -> dict:
    """One speech request through the runner: time to its first audio chunk, its end, its audio seconds."""
    from omni_ray.runner import StageArgs, run_pipeline

    pipe, kinds = omni.config.pipelines["omni"], omni._kinds()
    backends = {s.stage: omni._backend(s.stage) for s in pipe.steps}
    sargs = StageArgs.from_kwargs(dict(
        max_tokens=args.thinker_tokens, ignore_eos=True, temperature=0.7, seed=i,
        stage_args={"talker": {"max_tokens": args.codes, "ignore_eos": True},
                    "token2wav": {"num_inference_steps": args.steps, "seed": i}}))
    sargs.validate("omni", pipe, kinds)
    t0, first, samples, rate = time.perf_counter(), None, 0, 24000
    async for ev in run_pipeline(pipe, backends, kinds, PROMPT, f"bench-{i}-{time.monotonic_ns()}", sargs,
                                 audio={"voice": "Chelsie"}):
        if ev["type"] == "audio" and first is None:
            first = time.perf_counter() - t0
        if ev["type"] == "result":
            samples, rate = len(ev["audio"]["samples"]), ev["audio"]["sample_rate"]
    return {"first_audio_s": first, "total_s": time.perf_counter() - t0, "audio_s": samples / rate}


def run_omni(path: str, args) -> list[dict]:
    from omni_ray import OmniLLM

    rows = []
    with OmniLLM(omni_config(path, args.device, args.blocks)) as omni:
        async def batch(n: int, base: int):
            return await asyncio.gather(*(one_request(omni, args, base + i) for i in range(n)))

        omni._run(batch(1, 10_000))                                   # warm-up: compile, allocate, load voices
        for n in args.concurrency:
            t0 = time.perf_counter()
            res = omni._run(batch(n, 0))
            wall = time.perf_counter() - t0
            audio = sum(r["audio_s"] for r in res)
            rows.append({"engine": "omni-ray", "concurrency": n,
                         "first_audio_ms": 1000 * sum(r["first_audio_s"] for r in res) / n,
                         "rtf_per_request": sum(r["total_s"] / r["audio_s"] for r in res) / n,
                         "rtf_batch": wall / audio, "audio_s": audio / n, "wall_s": wall})
    return rows


def run_transformers(path: str, args) -> list[dict]:
    """transformers' own speech path: one request at a time (its ``generate`` decodes token2wav per sample)."""
    from transformers import AutoTokenizer, Qwen2_5OmniForConditionalGeneration

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=dtype).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].to(dev)
    tk = model.config.talker_config

    def call(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(ids, speaker="Chelsie", thinker_max_new_tokens=args.thinker_tokens,
                                  thinker_min_new_tokens=args.thinker_tokens, thinker_do_sample=True,
                                  thinker_temperature=0.7, talker_max_new_tokens=args.codes,
                                  talker_min_new_tokens=args.codes,
                                  talker_eos_token_id=[tk.tts_codec_pad_token_id, tk.tts_codec_end_token_id],
                                  token2wav_num_steps=args.steps)

    call(0)                                                            # warm-up
    rows = []
    for n in args.concurrency:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, firsts, audio = time.perf_counter(), [], 0.0
        for i in range(n):                                             # no batching of speech in its generate
            _, wav = call(i)
            firsts.append(time.perf_counter() - t0)                    # a queued request waits for the earlier ones
            audio += wav.numel() / 24000
        wall = time.perf_counter() - t0
        rows.append({"engine": "transformers", "concurrency": n, "first_audio_ms": 1000 * sum(firsts) / n,
                     "rtf_per_request": sum(firsts) / audio, "rtf_batch": wall / audio, "audio_s": audio / n,
                     "wall_s": wall})
    model.to("cpu")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny:qwen2.5-omni (a CPU smoke run of the script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--thinker-tokens", type=int, default=32)
    ap.add_argument("--codes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10, help="token2wav time points (the reference's default: 10)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--blocks", type=int, default=64, help="KV blocks (256 tokens each) of each AR engine")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()

    from omni_ray.testing import resolve_model

    path = str(resolve_model("tiny:qwen2.5-omni" if args.tiny else "shape:qwen2.5-omni-7b"))
    rows = run_omni(path, args)
    if not args.skip_transformers:
        rows += run_transformers(path, args)
    print(table(rows, ["engine", "concurrency", "first_audio_ms", "rtf_per_request", "rtf_batch", "audio_s",
                       "wall_s"]))
    dev = torch.device(args.device).type
    print(write_result(f"speech_{dev}{'_tiny' if args.tiny else ''}.json", {
        "model": "tiny" if args.tiny else "qwen2.5-omni-7b shape", "gpu": device_name(), "args": vars(args),
        "rows": rows}))


if __name__ == "__main__":
    main()
