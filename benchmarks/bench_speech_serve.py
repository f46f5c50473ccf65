"""Qwen2.5-Omni speech out on Ray Serve: thinker, talker and token2wav as three deployments (their own replicas,
the thinker's hidden states handed to the talker replica as ObjectRefs, codes fed to token2wav as they come),
driven by the pipeline runner over their Serve handles exactly as the ingress drives them
(``remote_backends``), against the same three stages in one process (``OmniLLM``) in the same run: what the
Serve hops cost.

Per request: time to the first audio byte (the first PCM chunk out of the runner), the whole request, the
seconds of audio made, and the real-time factor RTF = wall seconds per second of audio; at concurrency 1
(median of --repeats) and 16 (submitted together). Issue #26's goal on one GPU: first audio <= 150 ms and
RTF <= 0.1 at concurrency 1.

    python benchmarks/bench_speech_serve.py                  # GPU: shape:qwen2.5-omni-7b, the three stages on one GPU
    python benchmarks/bench_speech_serve.py --model /models/Qwen2.5-Omni-7B
    python benchmarks/bench_speech_serve.py --tiny           # CPU smoke run: tiny:qwen2.5-omni, few tokens

On one GPU the stages share it (fractional ``num_gpus``; KV caches sized for the concurrency, not a share of
memory). Serve runs first, then is shut down and the offline engines start (not both at once). Sampling: the
reference's talker defaults, seeded; EOS ignored (the thinker answers --text-tokens tokens, the talker makes
up to --codes codes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_serve import free_port  # noqa: E402
from benchmarks.common import table, write_result  # noqa: E402

CODEC_HZ = 50                         # Qwen2.5-Omni codec tokens per second of audio
VOICE = "Chelsie"
PROMPT = "Tell me a short story about a lighthouse keeper who finds a message in a bottle."
STAGES = ("thinker", "talker", "t2w")
PIPE = "speech"


def omni_config(path: str, gpu: bool, concurrency: int, text_tokens: int, codes: int, first_chunk: int | None = None,
                precision: str = "fp32") -> dict:
    """The three stages on one checkpoint, each one deployment (one replica), and the graph pipeline; token2wav's
    first chunk (``first_chunk`` mel frames, None: Qwen's plan) and forward precision as given."""
    ar: dict = {"device": "cuda" if gpu else "cpu", "enforce_eager": not gpu}

    def sized(n_len: int) -> dict:
        block = 256 if gpu else 16
        return {"cache": {"num_blocks": concurrency * -(-n_len // block) + 8, "block_size": block},
                "scheduler": {"max_num_seqs": max(32, concurrency), "max_model_len": n_len}}

    prompt_len = 256
    dep = {"num_replicas": 1, "max_ongoing_requests": 256, "num_cpus": 1 if gpu else 0.1}
    share = {"thinker": 0.4, "talker": 0.3, "t2w": 0.3}
    stages = {
        "thinker": {"kind": "ar", "engine": {"model": {"path": path}} | ar | sized(prompt_len + text_tokens + 8)},
        "talker": {"kind": "ar", "engine": {"model": {"path": path, "submodel": "talker"}} | ar
                   | sized(prompt_len + codes + 8)},
        "t2w": {"kind": "dit", "engine": {"model": {"path": path}, "device": ar["device"],
                                          "max_batch_size": max(8, concurrency), "token2wav_precision": precision}
                | ({"token2wav_stream": {"first_chunk_frames": first_chunk, "first_lookahead_frames": 0}}
                   if first_chunk else {})},
    }
    for k, s in stages.items():
        s["deployment"] = dep | ({"num_gpus": share[k]} if gpu else {})
    return {"app": {"name": "speech-bench", "ingress": {"num_replicas": 1, "num_cpus": 0.1 if not gpu else 1}},
            "stages": stages,
            "pipelines": {PIPE: {"graph": {"model": "thinker", "stages": {"talker": "talker", "token2wav": "t2w"}}}}}


def request_args(text_tokens: int, codes: int, steps: int | None, seed: int) -> dict:
    t2w = {"seed": seed} | ({"num_inference_steps": steps} if steps else {})
    return {"max_tokens": text_tokens, "ignore_eos": True, "seed": seed,
            "stage_args": {"talker": {"max_tokens": codes, "ignore_eos": True}, "t2w": t2w}}


async def timed(events) -> dict:
    """Time to the first audio chunk, the whole request, the audio made (seconds) of one runner's events."""
    t0 = time.perf_counter()
    first, samples, rate = None, 0, 24000
    async with contextlib.aclosing(events) as evs:
        async for ev in evs:
            if ev["type"] == "audio":
                first = first if first is not None else time.perf_counter() - t0
                samples += len(ev["pcm"])
                rate = ev["sample_rate"]
    total = time.perf_counter() - t0
    audio_s = samples / rate
    return {"first_audio_s": first, "total_s": total, "audio_s": audio_s,
            "rtf": total / audio_s if audio_s else float("nan")}


def summary(impl: str, c: int, rows: list[dict]) -> dict:
    """Medians over the requests (concurrency 1: over the repeats)."""
    def med(key: str, scale: float = 1.0, digits: int = 3) -> float:
        vals = [r[key] for r in rows if r[key] is not None]
        return round(scale * statistics.median(vals), digits) if vals else float("nan")
    return {"impl": impl, "concurrency": c, "first_audio_ms": med("first_audio_s", 1e3, 1), "total_s": med("total_s"),
            "audio_s": med("audio_s", digits=2), "rtf": med("rtf")}


async def run_levels(make_events, levels: list[int], repeats: int, impl: str) -> list[dict]:
    """``make_events(i)``: one request's runner events. Warm-up, then each concurrency level."""
    await timed(make_events("warm"))
    out = []
    for c in levels:
        if c == 1:
            rows = [await timed(make_events(f"c1-{r}")) for r in range(repeats)]
        else:
            rows = await asyncio.gather(*(timed(make_events(f"c{c}-{i}")) for i in range(c)))
        out.append(summary(impl, c, list(rows)))
        print(out[-1], flush=True)
    return out


def serve_rows(cfg: dict, a) -> list[dict]:
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.ingress.catalog import Catalog
    from deployments.ingress.remote_stages import remote_backends
    from deployments.ingress.stage_health import StageHealth
    from omni_ray.config import OmniConfig, validate
    from omni_ray.graphs import expand_pipelines
    from omni_ray.runner import StageArgs, run_pipeline

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    t0 = time.perf_counter()
    serve.run(build_app({"config": cfg}), name="speech-bench", route_prefix="/speech-bench")
    print(f"serve up in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        full = expand_pipelines(validate(OmniConfig, cfg))
        catalog = Catalog(full)
        handles = {k: serve.get_deployment_handle(k, app_name="speech-bench") for k in STAGES}
        pipe = full.pipelines[PIPE]

        async def go() -> list[dict]:
            health = StageHealth(handles)
            backends = remote_backends(handles, catalog, health, batch=full.app.stage_call_batch)

            def events(tag):
                args = StageArgs.from_kwargs(copy.deepcopy(request_args(a.text_tokens, a.codes, a.steps, 1)))
                args.validate(PIPE, pipe, catalog.kinds)
                return run_pipeline(pipe, backends, catalog.kinds, PROMPT, f"bench-{tag}", args, audio={"voice": VOICE})

            try:
                return await run_levels(events, a.concurrency, a.repeats, "omni-ray serve")
            finally:
                await health.close()

        return asyncio.run(go())
    finally:
        serve.shutdown()
        ray.shutdown()


def offline_rows(cfg: dict, a) -> list[dict]:
    from omni_ray import OmniLLM
    from omni_ray.runner import StageArgs, run_pipeline

    with OmniLLM(cfg) as omni:
        pipe, kinds = omni.config.pipelines[PIPE], omni._kinds()
        backends = {s.stage: omni._backend(s.stage) for s in pipe.steps}

        async def go() -> list[dict]:
            def events(tag):
                args = StageArgs.from_kwargs(copy.deepcopy(request_args(a.text_tokens, a.codes, a.steps, 1)))
                args.validate(PIPE, pipe, kinds)
                return run_pipeline(pipe, backends, kinds, PROMPT, f"off-{tag}", args, audio={"voice": VOICE})
            return await run_levels(events, a.concurrency, a.repeats, "omni-ray offline")

        return omni._run(go())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: shape:qwen2.5-omni-7b (GPU), tiny:qwen2.5-omni (--tiny)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny:qwen2.5-omni")
    p.add_argument("--text-tokens", type=int, default=None, help="thinker tokens per request (default 64; tiny 8)")
    p.add_argument("--codes", type=int, default=None, help="talker codes per request (default 200; tiny 60)")
    p.add_argument("--steps", type=int, default=None, help="token2wav ODE steps (default: the reference's; tiny 2)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 16 (tiny 1 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--first-chunk-frames", default="24", metavar="N",
                   help="token2wav's first chunk in mel frames, or 'ref' for Qwen's plan (default 24, as "
                        "serve_config.gpu.yaml)")
    p.add_argument("--token2wav-precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="token2wav's forward precision (default: bf16 on the GPU as serve_config.gpu.yaml, fp32 tiny)")
    a = p.parse_args()
    a.model = a.model or ("tiny:qwen2.5-omni" if a.tiny else "shape:qwen2.5-omni-7b")
    a.text_tokens = a.text_tokens or (8 if a.tiny else 64)
    a.codes = a.codes or (60 if a.tiny else 200)
    a.steps = a.steps or (2 if a.tiny else None)
    a.concurrency = a.concurrency or ([1, 2] if a.tiny else [1, 16])
    if a.tiny:
        a.repeats = min(a.repeats, 2)
    a.token2wav_precision = a.token2wav_precision or ("fp32" if a.tiny else "bf16")
    first = None if a.first_chunk_frames == "ref" else int(a.first_chunk_frames)
    cfg = omni_config(a.model, not a.tiny, max(a.concurrency), a.text_tokens, a.codes, first, a.token2wav_precision)

    rows = serve_rows(cfg, a)
    if not a.skip_offline:
        rows += offline_rows(cfg, a)
    print(table(rows, ["impl", "concurrency", "first_audio_ms", "total_s", "audio_s", "rtf"]))
    name = "speech_serve_cpu_tiny.json" if a.tiny else "speech_serve_gpu.json"
    path = write_result(name, {"model": a.model,
                               "text_tokens": a.text_tokens, "codes": a.codes, "steps": a.steps,
                               "first_chunk_frames": a.first_chunk_frames, "token2wav_precision": a.token2wav_precision,
                               "codec_hz": CODEC_HZ, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
