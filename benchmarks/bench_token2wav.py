"""Qwen2.5-Omni token2wav (codec tokens -> mel -> 24 kHz waveform) on the DiT engine vs transformers'
``Qwen2_5OmniToken2WavModel``, at the 7B checkpoint's token2wav shape (transformers' default
``Qwen2_5OmniDiTConfig`` / ``Qwen2_5OmniBigVGANConfig``: DiT 22 layers x 1024, BigVGAN 1536 channels),
random float32 weights built on the GPU (the reference runs token2wav in float32), two random voices.

    python benchmarks/bench_token2wav.py                    # 200 codes (4 s of audio), 10 time points
    python benchmarks/bench_token2wav.py --modes eager graphs --concurrency 1 4 16
    python benchmarks/bench_token2wav.py --modes graphs forward-graphs bf16 --concurrency 1 16 --window-frames 24 96 144
    python benchmarks/bench_token2wav.py --shape tiny --device cpu      # a smoke run of the script
    python benchmarks/bench_token2wav.py --modes graphs --concurrency 1 --first-chunk-frames ref 24 48
    python benchmarks/bench_token2wav.py --modes bf16-layered bf16 bf16-compile bf16-layered-compile \
        --concurrency 1 --window-frames 24 96 --no-vocoder --no-transformers     # the fused forward vs layered
    python benchmarks/bench_token2wav.py --vocoder-only --vocoder-batch 1 4 8      # the vocoder section alone

V. the vocoder (BigVGAN) alone, first (quick: < 1 minute on an H100): per mel length (``--vocoder-frames``; default:
   the lengths the chunk plans of ``--first-chunk-frames`` vocode every non-last chunk at, e.g. 24 72 112) and batch
   size (``--vocoder-batch``), eager (transformers' forward) vs CUDA graphs (omni_ray/dit/vocoder_graphs.py) in fp32
   and bf16: ms per call and per mel, the capture's time, the graphs' max |diff| to eager and bf16's relative rms
   to fp32 (benchmarks/token2wav_vocoder.py); ``--no-vocoder`` skips it, ``--vocoder-only`` runs it alone.

Per engine mode (``eager``: ``cuda_graphs: false``, each batch's whole ODE run eagerly; ``graphs``: each batch's
whole ODE as one CUDA graph per (row bucket, frame bucket, steps, sway, guidance), omni_ray/dit/token2wav_ode.py;
``forward-graphs``: one RK4 evaluation per engine step, whole forwards as CUDA graphs per (row bucket, frame
bucket), omni_ray/dit/token2wav_graphs.py (``token2wav_whole_ode: false``); ``tf32`` / ``bf16``: ``graphs`` with
``token2wav_precision``; ``bf16-layered``: ``bf16`` layer by layer (``token2wav_fused_forward: false``);
``-compile``: with ``compile: true``, which compiles the shared family's layer-by-layer blocks for every later
mode too, so list those modes last), each workload run once to capture its shapes, then timed:

0. one streamed window's ODE (``--window-frames`` mel frames, N windows at once, the mel only: no vocoder), the
   median of ``--repeats`` runs: the DiT's share of a stream's first audio;

1. whole utterances at each concurrency (the engine batches their forwards): wall time, RTF per utterance
   (wall seconds per second of one utterance's audio) and aggregate (per second of all the audio);
2. streamed (chunked) synthesis of N utterances at once, as the token2wav stage runs it, per chunk plan
   (``--first-chunk-frames``: ``ref``, Qwen's streaming plan, whose first window needs 48 codes, and first
   chunks of N mel frames with ``--first-lookahead-frames``, ``token2wav_stream`` in the engine config): the
   first windows' audio once their codes exist (the stage's first-audio latency once the talker has produced
   them), the whole streams' RTF, and (one stream) the streamed waveform's max |diff| and relative rms
   difference to the whole-utterance synthesis;
3. transformers' ``token2wav(...)`` on one utterance and N one by one (as ``generate(return_audio=True)``
   decodes them), and each mode's max |diff| of the whole-utterance waveform against the eager engine's.
Results: benchmarks/results/token2wav_<device>.json, written after each section (a failing section is printed,
recorded under ``errors`` and the next one runs). The engine modes capture the chunk plans' vocoder lengths when
they start, as the token2wav stage does, so a stream's first audio replays a vocoder graph in the graphed modes.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, device_name, table, write_result  # noqa: E402
from benchmarks.token2wav_vocoder import VOCODER_COLUMNS, vocoder_rows  # noqa: E402
from omni_ray.config import DiTEngineConfig, ModelConfig, Token2WavStreamConfig  # noqa: E402
from omni_ray.dit import DiffusionParams, DiTEngine, SpeechInput  # noqa: E402
from omni_ray.dit.families.qwen2_5_omni_token2wav import Qwen2_5OmniToken2WavFamily  # noqa: E402
from omni_ray.dit.token2wav_chunks import ChunkPlan, SpeechStream  # noqa: E402

TINY_DIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ff_mult=2, emb_dim=16, head_dim=16,
                look_ahead_layers=[1], look_backward_layers=[0], num_embeds=64, mel_dim=80, enc_emb_dim=16,
                enc_dim=16, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8, enc_se_channels=8)
TINY_BIGVGAN = dict(upsample_initial_channel=64, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]])


def build(shape: str, device: str):
    """(transformers' token2wav in float32 on ``device``, voices as spk_dict.pt holds them)."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel

    cfg = (Qwen2_5OmniToken2WavConfig() if shape == "7b"
           else Qwen2_5OmniToken2WavConfig(dit_config=TINY_DIT, bigvgan_config=TINY_BIGVGAN))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5OmniToken2WavModel._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model = model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    d = cfg.dit_config
    voices = {name: {"cond": torch.randn(1, d.enc_emb_dim, generator=g),
                     "ref_mel": torch.randn(1, 300, d.mel_dim, generator=g)} for name in ("Chelsie", "Ethan")}
    return model, voices


def reference(model, voices, codes: torch.Tensor, voice: str, seed: int, steps: int) -> torch.Tensor:
    v = voices[voice]
    dev = next(model.parameters()).device
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(codes[None].to(dev), conditioning=v["cond"].to(dev), reference_mel=v["ref_mel"].to(dev),
                     num_steps=steps).reshape(-1)


MODES = {"eager": {"cuda_graphs": False}, "graphs": {}, "forward-graphs": {"token2wav_whole_ode": False},
         "tf32": {"token2wav_precision": "tf32"}, "bf16": {"token2wav_precision": "bf16"},
         "bf16-layered": {"token2wav_precision": "bf16", "token2wav_fused_forward": False},
         "bf16-compile": {"token2wav_precision": "bf16", "compile": True},
         "bf16-layered-compile": {"token2wav_precision": "bf16", "token2wav_fused_forward": False, "compile": True}}


def window_ode(engine, codes: list, frames: int, n: int, params, repeats: int) -> float:
    """Median seconds of n stream windows of ``frames`` mel frames synthesized together, to the mel (no vocoder);
    a first run captures the shape."""
    fam = engine.family
    speech = [SpeechInput(codes[i][:frames // fam.repeats], "Chelsie",
                          noise=torch.randn(frames, fam.mel_dim, generator=torch.Generator().manual_seed(i)))
              for i in range(n)]
    times = []
    for _ in range(repeats + 1):
        with Timer() as t:
            engine.generate(params=[params(i) for i in range(n)], speech=speech, output_type="latent", use_tqdm=False)
        times.append(t.s)
    return float(np.median(times[1:]))


def whole(engine, codes: list, n: int, params) -> tuple[float, list]:
    with Timer() as t:
        waves = engine.generate(params=[params(i) for i in range(n)],
                                speech=[SpeechInput(codes[i], "Ethan") for i in range(n)], use_tqdm=False)
    return t.s, waves


def streamed(engine, codes: list, n: int, params, plan: ChunkPlan) -> tuple[float, float, np.ndarray]:
    """(seconds to the first windows' audio of n streams, seconds to the end of all n streams, the first
    stream's waveform): each stream gets the codes its first window needs, then the rest at once."""
    fam, k = engine.family, plan.codes_needed(0)
    streams = [SpeechStream(fam, "Chelsie", seed=5 + i, plan=plan) for i in range(n)]
    pieces: list[list] = [[] for _ in range(n)]
    with Timer() as t_first:
        first = [s.push(codes[i][:k], finished=len(codes[i]) <= k)[0] for i, s in enumerate(streams)]
        mels = engine.generate(params=[params(5 + i) for i in range(n)], speech=[w.speech for w in first],
                               output_type="latent", use_tqdm=False)
        for i, (s, w, m) in enumerate(zip(streams, first, mels)):
            pieces[i].append(s.audio(w, m))
    with Timer() as t_rest:
        rest = [(s, w, i) for i, s in enumerate(streams) if not s.finished
                for w in s.push(codes[i][k:], finished=True)]
        if rest:
            mels = engine.generate(params=[params(5 + i) for _, _, i in rest], speech=[w.speech for _, w, _ in rest],
                                   output_type="latent", use_tqdm=False)
            for (s, w, i), m in zip(rest, mels):
                pieces[i].append(s.audio(w, m))
    return t_first.s, t_first.s + t_rest.s, np.concatenate(pieces[0])


def vs_whole(engine, codes, stream_wave: np.ndarray, params, plan: ChunkPlan) -> dict:
    """The first stream's waveform against the whole utterance synthesized from the same noise."""
    noise = SpeechStream(engine.family, "Chelsie", seed=5, plan=plan).noise[:len(codes) * engine.family.repeats]
    whole = engine.generate(params=params(5), speech=SpeechInput(codes, "Chelsie", noise=noise), use_tqdm=False)[0]
    diff = stream_wave - whole
    return {"max_abs_diff": float(np.abs(diff).max()),
            "rel_rms_diff": float(np.sqrt((diff ** 2).mean() / (whole ** 2).mean()))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--codes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["eager", "graphs", "forward-graphs", "bf16"])
    ap.add_argument("--window-frames", type=int, nargs="+", default=[24, 96, 144],
                    help="mel frames of the timed stream windows (default: 24 96 144)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per window shape (median)")
    ap.add_argument("--first-chunk-frames", nargs="+", default=["ref", "24"], metavar="N",
                    help="chunk plans of the streamed rows: ref (Qwen's streaming plan) or the first chunk's mel "
                         "frames (default: ref 24)")
    ap.add_argument("--first-lookahead-frames", type=int, default=0, help="the first chunks' look-ahead (default 0)")
    ap.add_argument("--no-transformers", action="store_true", help="skip transformers' rows")
    ap.add_argument("--vocoder-frames", type=int, nargs="+", default=None,
                    help="mel lengths of the vocoder section (default: the chunk plans' recurring vocoder lengths)")
    ap.add_argument("--vocoder-batch", type=int, nargs="+", default=[1, 4], help="vocoder batch sizes (default 1 4)")
    ap.add_argument("--vocoder-repeats", type=int, default=10, help="timed vocoder calls per shape (median)")
    ap.add_argument("--no-vocoder", action="store_true", help="skip the vocoder section")
    ap.add_argument("--vocoder-only", action="store_true", help="run the vocoder section alone")
    args = ap.parse_args()
    dev = torch.device(args.device)
    model, voices = build(args.shape, args.device)
    fam = Qwen2_5OmniToken2WavFamily({"token2wav": model, "voices": voices}, dev, torch.float32, None)
    g = torch.Generator().manual_seed(1)
    vocab = fam.num_codes - 1
    top = max(args.concurrency)
    codes = [torch.randint(0, vocab, (args.codes,), generator=g) for _ in range(top)]
    audio_s = args.codes * fam.repeats / 100              # 100 mel frames per second of audio
    params = lambda seed: DiffusionParams(seed=seed, num_inference_steps=args.steps)  # noqa: E731
    plans = {f: ChunkPlan.for_family(fam, None if f == "ref" else Token2WavStreamConfig(
        first_chunk_frames=int(f), first_lookahead_frames=args.first_lookahead_frames))
        for f in args.first_chunk_frames}

    rows, win_rows, result = [], [], {"shape": args.shape, "codes": args.codes, "audio_s": audio_s, "steps": args.steps,
                                      "modes": {}, "errors": {}}
    suffix = ("_tiny" if args.shape == "tiny" else "") + ("_vocoder" if args.vocoder_only else "")
    out_name = f"token2wav_{dev.type}{suffix}.json"
    vocoder_lengths = sorted({n for plan in plans.values() for n in plan.vocoder_lengths()})

    def section(name: str, fn) -> None:
        """Run one section; its failure is printed and recorded, and the JSON is written either way."""
        try:
            fn()
        except Exception as err:                      # noqa: BLE001 - the next sections still run
            traceback.print_exc()
            result["errors"][name] = repr(err)
        finally:
            write_result(out_name, result)

    def vocoder() -> None:
        frames = args.vocoder_frames or vocoder_lengths
        voc_rows, result["vocoder"] = vocoder_rows(fam, frames, args.vocoder_batch, args.vocoder_repeats)
        print(f"vocoder (BigVGAN, {args.shape}) on {device_name()}: eager (transformers' forward, fp32) vs CUDA "
              f"graphs, host mels in, host waveforms out; median of {args.vocoder_repeats} calls")
        print(table(voc_rows, VOCODER_COLUMNS))

    baseline = None

    def engine_mode(mode: str) -> None:
        nonlocal baseline
        cfg = DiTEngineConfig(model=ModelConfig(path="in-memory"), device=args.device, max_batch_size=top,
                              **MODES[mode])
        engine = DiTEngine(cfg, family=fam)
        fam.vocoder_graphs.warmup(vocoder_lengths)        # as the token2wav stage does when it starts
        res = result["modes"][mode] = {}
        for n in args.concurrency:
            for frames in [f for f in args.window_frames if f <= args.codes * fam.repeats]:
                ms = 1000 * window_ode(engine, codes, frames, n, params, args.repeats)
                res.setdefault("window_ode_ms", {}).setdefault(f"concurrency_{n}", {})[frames] = ms
                win_rows.append({"mode": mode, "n": n, "window frames": frames, "window ODE ms": ms,
                                 "ms per forward": ms / (4 * (args.steps - 1))})
            for _ in range(2):                                # capture / warm up this workload's shapes (the
                whole(engine, codes, n, params)               # vocoder's: on their second sighting)
            t_whole, waves = whole(engine, codes, n, params)
            if n == 1:
                if baseline is None:
                    baseline = waves[0]
                res["max_abs_diff_vs_first_mode"] = float(np.abs(waves[0] - baseline).max())
            res[f"concurrency_{n}"] = {"whole_s": t_whole, "whole_rtf": t_whole / audio_s, "streams": {}}
            for name, plan in plans.items():
                for _ in range(2):                            # capture / warm up the plan's window shapes
                    streamed(engine, codes, n, params, plan)
                t_first, t_stream, wave = streamed(engine, codes, n, params, plan)
                quality = vs_whole(engine, codes[0], wave, params, plan) if n == 1 else {}
                res[f"concurrency_{n}"]["streams"][name] = {
                    "first_window_codes": plan.codes_needed(0), "first_audio_s": t_first, "stream_s": t_stream,
                    "stream_rtf": t_stream / audio_s} | quality
                rows.append({"mode": mode, "n": n, "whole s": t_whole, "whole RTF": t_whole / audio_s,
                             "aggregate RTF": t_whole / (n * audio_s), "first chunk": name,
                             "first window codes": plan.codes_needed(0), "stream first audio ms": 1000 * t_first,
                             "stream RTF": t_stream / audio_s, "max |diff| vs whole": quality.get("max_abs_diff", ""),
                             "rel rms diff vs whole": quality.get("rel_rms_diff", "")})
        stats = engine.engine_stats()
        for k in ("cuda_graphs", "cuda_graph_replays", "ode_graphs", "ode_graph_replays", "vocoder_graphs",
                  "vocoder_graph_replays"):
            res[k] = stats.get(k, 0)
        del engine
        fam.vocoder_graphs = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def transformers_rows() -> None:
        reference(model, voices, codes[0][:24], "Chelsie", 0, 2)       # warm-up
        ref_rows = {}
        for n in args.concurrency:
            with Timer() as t_r:
                for i in range(n):
                    reference(model, voices, codes[i], "Ethan", i, args.steps)
            ref_rows[f"concurrency_{n}"] = t_r.s
            rows.append({"mode": "transformers, one by one", "n": n, "whole s": t_r.s, "whole RTF": t_r.s / audio_s,
                         "aggregate RTF": t_r.s / (n * audio_s)})
        result["transformers_s"] = ref_rows

    if not args.no_vocoder:
        section("vocoder", vocoder)
    if not args.vocoder_only:
        for mode in args.modes:
            section(mode, lambda mode=mode: engine_mode(mode))
        if not args.no_transformers:
            section("transformers", transformers_rows)
        print(f"token2wav {args.shape} on {device_name()}: {args.codes} codes = {audio_s:.1f} s of audio, "
              f"{args.steps} time points ({4 * (args.steps - 1)} forwards); RTF: wall s per s of one utterance's audio")
        print(table(win_rows, ["mode", "n", "window frames", "window ODE ms", "ms per forward"]))
        print(table(rows, ["mode", "n", "whole s", "whole RTF", "aggregate RTF", "first chunk", "first window codes",
                           "stream first audio ms", "stream RTF", "max |diff| vs whole", "rel rms diff vs whole"]))
        for mode, res in result["modes"].items():
            print(f"{mode}: {res.get('ode_graphs', 0)} whole-ODE graphs ({res.get('ode_graph_replays', 0)} replays), "
                  f"{res.get('cuda_graphs', 0)} forward graphs ({res.get('cuda_graph_replays', 0)} replays), "
                  f"{res.get('vocoder_graphs', 0)} vocoder graphs ({res.get('vocoder_graph_replays', 0)} replays), "
                  f"max |diff| vs {args.modes[0]} {res.get('max_abs_diff_vs_first_mode', float('nan')):.2e}")
    if result["errors"]:
        print(f"sections that failed: {result['errors']}")
    path = write_result(out_name, result)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
