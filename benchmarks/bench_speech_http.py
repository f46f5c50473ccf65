"""Qwen2.5-Omni speech out through the OpenAI API: the Serve app's three stages (thinker, talker, token2wav)
behind the ingress, measured from an HTTP client, against the same pipeline offline (``OmniLLM``, no Ray, no
HTTP) in the same run: what the Serve hop and the API layer add to speech.

Per request (a text prompt in; ``--text-tokens`` thinker tokens, ``--codes`` codec tokens: ~4 s of audio at
the codec's 50 per second; EOS ignored in the thinker, seeded):
- time to the first audio byte: the first ``delta.audio.data`` chunk of a streamed chat completion
  (``modalities: ["text", "audio"]``, pcm16), and the first body byte of ``POST /v1/audio/speech``
  (``response_format: pcm``, streamed as made);
- the real-time factor: wall seconds of the request per second of audio it got, at each ``--concurrency``
  (all requests sent together; the stages batch them), and the aggregate (the burst's wall time per second
  of all its audio);
- offline: the same requests through ``OmniLLM``'s runner (first ``audio`` event, RTF).
Goal (issue #26): first audio <= 150 ms and RTF <= 0.1 at concurrency 1 on one GPU; all three stages share
the GPU here (``num_gpus`` 0.3 each).

    python benchmarks/bench_speech_http.py                 # GPU: shape:qwen2.5-omni-7b (random bf16 weights)
    python benchmarks/bench_speech_http.py --quick         # CPU smoke run: tiny:qwen2.5-omni, few tokens

Writes benchmarks/results/speech_http_<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name, table, write_result  # noqa: E402

PROMPT = "Tell me a short story about a lighthouse keeper who finds a message in a bottle."
VOICE = "Chelsie"
RATE = 24000                      # Qwen2.5-Omni's waveform rate; pcm16: 2 bytes a sample


def stage_config(a) -> dict:
    gpu = a.device == "cuda"
    cache = {"block_size": 256, "gpu_memory_utilization": 0.25} if gpu else {"block_size": 16, "num_blocks": 512}
    ar = {"device": a.device, "enforce_eager": not gpu, "cache": cache,
          "scheduler": {"max_num_batched_tokens": 8192, "max_num_seqs": 64, "max_model_len": 4096}}
    dep = {"num_replicas": 1, "max_ongoing_requests": 256, "num_cpus": 1 if gpu else 0.25,
           "num_gpus": 0.3 if gpu else 0}
    model = {"path": a.model}
    dtype = {"dtype": "bfloat16"} if gpu else {}
    return {
        "app": {"name": "omni-speech-bench", "request_timeout_s": 1200,
                "ingress": {"num_cpus": 1 if gpu else 0.25, "max_ongoing_requests": 1024}},
        "stages": {
            "omni": {"kind": "ar", "engine": {"model": model | {"name": "omni"} | dtype} | ar, "deployment": dep},
            "omni-talker": {"kind": "ar", "engine": {"model": model | {"name": "omni-talker", "submodel": "talker"}
                                                     | dtype} | ar, "deployment": dep},
            "omni-token2wav": {"kind": "dit", "engine": {"model": model | {"name": "omni-token2wav"},
                                                         "device": a.device, "max_batch_size": 32},
                               "deployment": dep}},
        "pipelines": {"omni-speech": {"graph": {"model": "omni", "stages": {"talker": "omni-talker",
                                                                            "token2wav": "omni-token2wav"}}}},
        "scheduler": {"enabled": True, "max_queue_size": 4096, "detached": False},
    }


def stage_args(a) -> dict:
    t2w = {"num_inference_steps": a.steps} if a.steps else {}
    return {"omni-talker": {"max_tokens": a.codes}, "omni-token2wav": t2w}


def chat_body(a, i: int) -> dict:
    return {"model": "omni", "messages": [{"role": "user", "content": f"{PROMPT} ({i})"}],
            "modalities": ["text", "audio"], "audio": {"voice": VOICE, "format": "pcm16"}, "stream": True,
            "max_tokens": a.text_tokens, "ignore_eos": True, "seed": i, "stage_args": stage_args(a)}


def speech_body(a, i: int) -> dict:
    return {"model": "omni", "input": f"{PROMPT} ({i})", "voice": VOICE, "response_format": "pcm",
            "max_tokens": a.text_tokens, "seed": i, "stage_args": stage_args(a)}


async def one_chat(client, a, i: int) -> dict:
    t0 = time.perf_counter()
    first, nbytes = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(a, i)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for c in json.loads(line[6:]).get("choices") or []:
                data = ((c.get("delta") or {}).get("audio") or {}).get("data")
                if data:
                    first = first or time.perf_counter()
                    nbytes += len(base64.b64decode(data))
    end = time.perf_counter()
    return {"first_s": (first or end) - t0, "total_s": end - t0, "audio_s": nbytes / 2 / RATE}


async def one_speech(client, a, i: int) -> dict:
    t0 = time.perf_counter()
    first, nbytes = None, 0
    async with client.stream("POST", "/v1/audio/speech", json=speech_body(a, i)) as r:
        r.raise_for_status()
        async for chunk in r.aiter_bytes():
            first = first or time.perf_counter()
            nbytes += len(chunk)
    end = time.perf_counter()
    return {"first_s": (first or end) - t0, "total_s": end - t0, "audio_s": nbytes / 2 / RATE}


def summary(name: str, c: int, runs: list[dict], wall: float) -> dict:
    audio = sum(r["audio_s"] for r in runs)
    return {"path": name, "concurrency": c, "first_audio_ms_p50": 1e3 * statistics.median(r["first_s"] for r in runs),
            "first_audio_ms_max": 1e3 * max(r["first_s"] for r in runs),
            "rtf_p50": statistics.median(r["total_s"] / r["audio_s"] for r in runs if r["audio_s"]) if audio else None,
            "rtf_aggregate": wall / audio if audio else None, "audio_s_per_request": audio / len(runs)}


async def http_rows(a, url: str) -> list[dict]:
    import httpx

    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=1200, limits=httpx.Limits(max_connections=1024)) as client:
        await asyncio.gather(*(one_chat(client, a, 10_000 + i) for i in range(max(a.concurrency))))   # warm-up
        for name, one in (("http chat (pcm16 stream)", one_chat), ("http /v1/audio/speech (pcm)", one_speech)):
            for c in a.concurrency:
                t0 = time.perf_counter()
                runs = await asyncio.gather(*(one(client, a, i) for i in range(c)))
                rows.append(summary(name, c, list(runs), time.perf_counter() - t0))
                print(rows[-1], flush=True)
    return rows


def serve_rows(a) -> list[dict]:
    import ray
    from ray import serve

    from benchmarks.bench_serve import free_port
    from deployments.app import build_app

    ray.init(include_dashboard=False, log_to_driver=False, **({"num_cpus": 4} if a.device == "cpu" else {}))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(build_app({"config": stage_config(a)}), name="omni-speech-bench", route_prefix="/")
    print(f"app up in {time.perf_counter() - t0:.0f}s", flush=True)
    try:
        return asyncio.run(http_rows(a, f"http://127.0.0.1:{port}"))
    finally:
        serve.shutdown()
        ray.shutdown()


def offline_rows(a) -> list[dict]:
    """The same chat requests through OmniLLM's runner in this process (no Ray, no HTTP)."""
    from omni_ray import OmniLLM
    from omni_ray.runner import StageArgs, run_pipeline

    cfg = stage_config(a)
    for st in cfg["stages"].values():
        st.pop("deployment", None)
    cfg.pop("scheduler")
    cfg["app"] = {"name": "offline"}
    rows = []
    with OmniLLM(cfg) as omni:
        pipe, kinds = omni.config.pipelines["omni-speech"], omni._kinds()
        backends = {s.stage: omni._backend(s.stage) for s in pipe.steps}

        async def one(i: int) -> dict:
            per = {"omni": {"max_tokens": a.text_tokens, "ignore_eos": True, "seed": i},
                   "omni-talker": {"max_tokens": a.codes, "seed": i},
                   "omni-token2wav": ({"num_inference_steps": a.steps} if a.steps else {}) | {"seed": i}}
            args = StageArgs(per_stage=per)
            args.validate("omni-speech", pipe, kinds)
            t0, first, n = time.perf_counter(), None, 0
            async for ev in run_pipeline(pipe, backends, kinds, None, f"off-{i}-{time.monotonic_ns()}", args,
                                         messages=[{"role": "user", "content": f"{PROMPT} ({i})"}],
                                         audio={"voice": VOICE}):
                if ev["type"] == "audio":
                    first = first or time.perf_counter()
                    n += len(ev["pcm"])
            end = time.perf_counter()
            return {"first_s": (first or end) - t0, "total_s": end - t0, "audio_s": n / RATE}

        async def burst(c: int, base: int) -> tuple[list[dict], float]:
            t0 = time.perf_counter()
            runs = await asyncio.gather(*(one(base + i) for i in range(c)))
            return list(runs), time.perf_counter() - t0

        omni._run(burst(max(a.concurrency), 10_000))                                    # warm-up
        for c in a.concurrency:
            runs, wall = omni._run(burst(c, 0))
            rows.append(summary("offline OmniLLM", c, runs, wall))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on tiny:qwen2.5-omni")
    ap.add_argument("--model", default=None, help="a Qwen2.5-Omni checkpoint (default shape:qwen2.5-omni-7b)")
    ap.add_argument("--text-tokens", type=int, default=None, help="thinker tokens per reply (default 32)")
    ap.add_argument("--codes", type=int, default=None, help="talker codec tokens per reply (default 200)")
    ap.add_argument("--steps", type=int, default=None, help="token2wav ODE steps (default: the checkpoint's)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--skip-offline", action="store_true")
    a = ap.parse_args()
    a.device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    from omni_ray.testing import resolve_model

    a.model = str(resolve_model(a.model or ("tiny:qwen2.5-omni" if a.quick else "shape:qwen2.5-omni-7b")))
    a.text_tokens = a.text_tokens or (4 if a.quick else 32)
    a.codes = a.codes or (16 if a.quick else 200)
    a.steps = a.steps or (2 if a.quick else None)
    a.concurrency = [1, 2] if a.quick else a.concurrency
    rows = [] if a.skip_offline else offline_rows(a)
    rows += serve_rows(a)
    print(table(rows, ["path", "concurrency", "first_audio_ms_p50", "first_audio_ms_max", "rtf_p50", "rtf_aggregate",
                       "audio_s_per_request"]))
    name = "speech_http_cpu_quick.json" if a.quick else f"speech_http_{a.device}.json"
    path = write_result(name, {"model": a.model, "text_tokens": a.text_tokens, "codes": a.codes, "steps": a.steps,
                               "device_name": device_name(), "goal": "first audio <= 150 ms, RTF <= 0.1 at c=1",
                               "rows": rows})
    print("wrote", path)


if __name__ == "__main__":
    main()
