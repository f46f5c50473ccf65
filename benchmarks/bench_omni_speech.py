"""Qwen2.5-Omni speech out, end to end: a text prompt in, ~200 codec tokens of speech out (4 s of audio at the
codec's 50 tokens per second), through the offline stage graph (``OmniLLM``'s pipeline: thinker -> talker ->
token2wav, the talker fed the thinker's states as they come, token2wav on chunks of codes, audio streamed
out chunk by chunk), against transformers' ``Qwen2_5OmniForConditionalGeneration.generate(..., return_audio=True)``
in the same run (concurrency 1: it runs one request at a time).

Per request: time to the first audio byte (the first pcm chunk leaving the pipeline), the time to its whole
utterance, the seconds of audio, and the real-time factor RTF = seconds of compute (wall time of the request)
per second of audio; at concurrency 1 and 16 (the requests submitted together, batched by every stage).
Goal (issue #26): first audio <= 150 ms and RTF <= 0.1 at concurrency 1 on one GPU.

The model: ``shape:qwen2.5-omni-7b`` (the 7B checkpoint's dimensions, random bf16 weights, built once into
the cache folder, ~22 GB; the talker's codec head rows of its special tokens are zero so that it speaks
real codes for as long as asked). The thinker answers ``--text-tokens`` tokens (EOS ignored); the talker
makes ``--codes`` codes (EOS ignored): after the thinker's reply it goes on on the text-pad row, as the
reference does. Sampling: the reference's defaults (the talker's top-k 40, top-p 0.8, temperature 0.9,
repetition penalty 1.05), seeded. (The tiny checkpoint's random talker samples its stop tokens: its
utterances end early; the columns say how many codes and seconds of audio each engine made.)

    python benchmarks/bench_omni_speech.py                 # GPU: 7B shape, concurrency 1 and 16, vs transformers
    python benchmarks/bench_omni_speech.py --tiny          # CPU smoke run: tiny:qwen2.5-omni, few tokens
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name, sync, table, write_result  # noqa: E402

CODEC_HZ = 50                       # Qwen2.5-Omni codec tokens per second of audio
VOICE = "Chelsie"
PROMPT = "Tell me a short story about a lighthouse keeper who finds a message in a bottle."


def omni_config(path: str, gpu: bool, concurrency: int, max_len: int, talker_len: int) -> dict:
    """Three stages on one checkpoint and the graph pipeline through them. On the GPU the KV caches are
    sized for ``concurrency`` requests (not a share of the GPU's memory: the stages and transformers'
    model share the card)."""
    ar = {"device": "cuda" if gpu else "cpu", "enforce_eager": not gpu}

    def sized(n_len: int) -> dict:
        if not gpu:
            return {}
        block = 256
        return {"cache": {"num_blocks": concurrency * -(-n_len // block) + 8, "block_size": block},
                "scheduler": {"max_num_seqs": max(32, concurrency), "max_model_len": n_len}}

    stages = {
        "thinker": {"kind": "ar", "engine": {"model": {"path": path}} | ar | sized(max_len)},
        "talker": {"kind": "ar", "engine": {"model": {"path": path, "submodel": "talker"}} | ar | sized(talker_len)},
        "t2w": {"kind": "dit", "engine": {"model": {"path": path}, "device": ar["device"]}},
    }
    graph = {"model": "thinker", "stages": {"talker": "talker", "token2wav": "t2w"}}
    return {"stages": stages, "pipelines": {"speech": {"graph": graph}}}


def _messages(i: int | None = None) -> list[dict]:
    return [{"role": "user", "content": PROMPT if i is None else f"{PROMPT} ({i})"}]


async def _one(pipe, backends, kinds, args, messages: list[dict]) -> dict:
    """One speech request through the pipeline's events: first audio chunk, end, audio seconds, codes."""
    from omni_ray.runner import run_pipeline

    t0 = time.perf_counter()
    first, audio, stages = None, None, None
    async for ev in run_pipeline(pipe, backends, kinds, None, f"bench-{uuid.uuid4().hex[:8]}", args,
                                 messages=messages, audio={"voice": VOICE}):
        if ev["type"] == "audio" and first is None and len(ev["pcm"]):
            first = time.perf_counter() - t0
        elif ev["type"] == "result":
            audio, stages = ev["audio"], ev["stages"]
    total = time.perf_counter() - t0
    seconds = len(audio["samples"]) / audio["sample_rate"]
    return dict(first_audio_ms=1e3 * first, total_s=total, audio_s=seconds, rtf=total / seconds,
                codes=stages[1].get("num_codes"), text_tokens=stages[0].get("num_output_tokens"))


def run_omni_ray(llm, n: int, text_tokens: int, codes: int, seed: int) -> dict:
    """``n`` requests at once (the pipeline's own coroutine per request, on the OmniLLM's engine loop, as
    ``OmniLLM.generate`` runs them, but watching each request's events for its first audio chunk)."""
    from omni_ray.runner import StageArgs

    args = StageArgs.from_kwargs(dict(max_tokens=text_tokens, ignore_eos=True, seed=seed,
                                      stage_args={"talker": {"max_tokens": codes, "ignore_eos": True}}))
    pipe, kinds = llm.config.pipelines["speech"], llm._kinds()
    args.validate("speech", pipe, kinds)
    backends = {s.stage: llm._backend(s.stage) for s in pipe.steps}

    async def burst():
        return await asyncio.gather(*(_one(pipe, backends, kinds, args, _messages(i)) for i in range(n)))

    sync()
    t0 = time.perf_counter()
    reqs = llm._run(burst())
    wall = time.perf_counter() - t0
    ttfa = sorted(r["first_audio_ms"] for r in reqs)
    audio = sum(r["audio_s"] for r in reqs)
    return dict(first_audio_ms=statistics.mean(ttfa), first_audio_p90_ms=ttfa[math.ceil(0.9 * len(ttfa)) - 1],
                rtf=statistics.mean(r["rtf"] for r in reqs), audio_s=audio / n, codes=reqs[0]["codes"],
                text_tokens=reqs[0]["text_tokens"], wall_s=wall, audio_s_per_s=audio / wall)


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
    return dict(first_audio_ms=1e3 * total, first_audio_p90_ms=1e3 * total, rtf=total / seconds, audio_s=seconds,
                codes=codes, text_tokens=text_tokens, wall_s=total, audio_s_per_s=seconds / total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny:qwen2.5-omni on the CPU, few tokens (a smoke run)")
    ap.add_argument("--model", default=None, help="checkpoint (default: shape:qwen2.5-omni-7b, or the tiny one)")
    ap.add_argument("--text-tokens", type=int, default=None, help="thinker reply tokens (default 48; tiny 6)")
    ap.add_argument("--codes", type=int, default=None, help="codec tokens per request (default 200; tiny 60)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 16 (tiny: 1 2)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.tiny
    text_tokens = args.text_tokens or (6 if args.tiny else 48)
    codes = args.codes or (60 if args.tiny else 200)
    levels = args.concurrency or ([1, 2] if args.tiny else [1, 16])

    from omni_ray.offline import OmniLLM
    from omni_ray.testing import resolve_model

    path = str(resolve_model(args.model or ("tiny:qwen2.5-omni" if args.tiny else "shape:qwen2.5-omni-7b")))
    t_build = time.perf_counter()
    llm = OmniLLM(omni_config(path, gpu, max(levels), max_len=1024, talker_len=1024 + codes))
    run_omni_ray(llm, 1, 4, 2 * CODEC_HZ // 5, args.seed)          # builds and warms the engines (a short one)
    print(f"engines up and warm in {time.perf_counter() - t_build:.1f} s")
    rows = []
    for c in levels:
        run_omni_ray(llm, c, text_tokens, codes, args.seed + 1)     # the batch sizes' first run: warm-up
        rows.append(dict(engine="omni-ray", concurrency=c, **run_omni_ray(llm, c, text_tokens, codes, args.seed)))
        print(table(rows[-1:], list(rows[-1])))
    stats = {k: v for k, v in llm.stats().items() if isinstance(v, dict)}
    llm.shutdown()
    if not args.no_transformers:
        from transformers import AutoTokenizer, Qwen2_5OmniForConditionalGeneration

        dtype = torch.bfloat16 if gpu else torch.float32
        hf = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=dtype).to("cuda" if gpu else "cpu").eval()
        tok = AutoTokenizer.from_pretrained(path)
        run_transformers(hf, tok, 2, 8, args.seed)                   # warm-up
        rows.append(dict(engine="transformers", concurrency=1, **run_transformers(hf, tok, text_tokens, codes,
                                                                                    args.seed)))
    print(f"Qwen2.5-Omni speech ({'tiny' if args.tiny else '7B shape'}), {device_name() if gpu else 'cpu'}, "
          f"thinker {text_tokens} tokens, talker {codes} codes ({codes / CODEC_HZ:.1f} s of audio) per request")
    print(table(rows, ["engine", "concurrency", "first_audio_ms", "first_audio_p90_ms", "rtf", "audio_s",
                       "wall_s", "audio_s_per_s", "codes", "text_tokens"]))
    name = f"omni_speech_{'cuda' if gpu else 'cpu_quick'}.json"
    print(write_result(name, dict(args=vars(args), model=path, rows=rows, stage_stats=stats)))


if __name__ == "__main__":
    main()
