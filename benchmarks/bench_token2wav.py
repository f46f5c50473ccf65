"""Qwen2.5-Omni token2wav (codec tokens -> mel -> 24 kHz waveform) on the DiT engine vs transformers'
``Qwen2_5OmniToken2WavModel``, at the 7B checkpoint's token2wav shape (transformers' default
``Qwen2_5OmniDiTConfig`` / ``Qwen2_5OmniBigVGANConfig``: DiT 22 layers x 1024, BigVGAN 1536 channels),
random float32 weights built on the GPU (the reference runs token2wav in float32), two random voices.

    python benchmarks/bench_token2wav.py                    # 200 codes (8 s of audio), 10 time points
    python benchmarks/bench_token2wav.py --codes 100 --concurrency 1 4 16
    python benchmarks/bench_token2wav.py --shape tiny --device cpu      # a smoke run of the script

1. one utterance: transformers ``token2wav(...)`` vs the engine, wall time and real-time factor (seconds of
   compute per second of audio); max |diff| of the waveforms (same seed, same noise);
2. N utterances at once (the engine batches their forwards; transformers decodes them one by one, as
   ``generate(return_audio=True)`` does): aggregate RTF and utterances/s;
3. chunked (streamed) synthesis: time from the first window's codes (48 codes) to its audio (the stage's
   first-audio latency once the talker has produced them), and RTF of the whole chunked utterance.
Results: benchmarks/results/token2wav_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, device_name, table, write_result  # noqa: E402
from omni_ray.config import DiTEngineConfig, ModelConfig  # noqa: E402
from omni_ray.dit import DiffusionParams, DiTEngine, SpeechInput  # noqa: E402
from omni_ray.dit.families.qwen2_5_omni_token2wav import Qwen2_5OmniToken2WavFamily  # noqa: E402
from omni_ray.dit.token2wav_chunks import SpeechStream  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--codes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    dev = torch.device(args.device)
    model, voices = build(args.shape, args.device)
    fam = Qwen2_5OmniToken2WavFamily({"token2wav": model, "voices": voices}, dev, torch.float32, None)
    engine = DiTEngine(DiTEngineConfig(model=ModelConfig(path="in-memory"), device=args.device,
                                       max_batch_size=max(args.concurrency)), family=fam)
    g = torch.Generator().manual_seed(1)
    vocab = fam.num_codes - 1
    codes = [torch.randint(0, vocab, (args.codes,), generator=g) for _ in range(max(args.concurrency))]
    audio_s = args.codes * fam.repeats / 100              # 100 mel frames per second of audio
    params = lambda seed: DiffusionParams(seed=seed, num_inference_steps=args.steps)  # noqa: E731

    # warm-up (kernels, allocator) on both sides
    reference(model, voices, codes[0][:24], "Chelsie", 0, 2)
    engine.generate(params=params(0), speech=SpeechInput(codes[0][:24], "Chelsie"), use_tqdm=False)

    rows, result = [], {"shape": args.shape, "codes": args.codes, "audio_s": audio_s, "steps": args.steps}
    with Timer() as t_ref:
        ref = reference(model, voices, codes[0], "Chelsie", 3, args.steps)
    with Timer() as t_eng:
        ours = engine.generate(params=params(3), speech=SpeechInput(codes[0], "Chelsie"), use_tqdm=False)[0]
    diff = float(np.abs(ours - ref.float().cpu().numpy()).max())
    rows += [{"run": "transformers, 1 utterance", "s": t_ref.s, "RTF": t_ref.s / audio_s},
             {"run": "engine, 1 utterance", "s": t_eng.s, "RTF": t_eng.s / audio_s}]
    result["single"] = {"transformers_s": t_ref.s, "engine_s": t_eng.s, "max_abs_diff": diff}

    for n in args.concurrency:
        if n == 1:
            continue
        with Timer() as t_r:
            for i in range(n):
                reference(model, voices, codes[i], "Ethan", i, args.steps)
        with Timer() as t_e:
            engine.generate(params=[params(i) for i in range(n)],
                            speech=[SpeechInput(codes[i], "Ethan") for i in range(n)], use_tqdm=False)
        rows += [{"run": f"transformers, {n} one by one", "s": t_r.s, "RTF": t_r.s / (n * audio_s)},
                 {"run": f"engine, {n} batched", "s": t_e.s, "RTF": t_e.s / (n * audio_s)}]
        result[f"concurrency_{n}"] = {"transformers_s": t_r.s, "engine_s": t_e.s,
                                      "engine_max_batch": engine.engine_stats()["max_batch_size"]}

    # chunked: the first window's audio once its 48 codes exist, then the rest
    stream = SpeechStream(fam, "Chelsie", seed=5)
    with Timer() as t_first:
        first = stream.push(codes[0][:48])
        mel = engine.generate(params=params(5), speech=first[0].speech, output_type="latent", use_tqdm=False)[0]
        stream.audio(first[0], mel)
    with Timer() as t_rest:
        rest = stream.push(codes[0][48:], finished=True)
        if rest:
            mels = engine.generate(params=params(5), speech=[w.speech for w in rest], output_type="latent",
                                   use_tqdm=False)
            for w, m in zip(rest, mels):
                stream.audio(w, m)
    rows.append({"run": "engine, chunked: first window", "s": t_first.s, "RTF": ""})
    rows.append({"run": "engine, chunked: whole utterance", "s": t_first.s + t_rest.s,
                 "RTF": (t_first.s + t_rest.s) / audio_s})
    result["chunked"] = {"first_audio_s": t_first.s, "total_s": t_first.s + t_rest.s}

    print(f"token2wav {args.shape} on {device_name()}: {args.codes} codes = {audio_s:.1f} s of audio, "
          f"{args.steps} time points ({4 * (args.steps - 1)} forwards); engine vs transformers max |diff| {diff:.2e}")
    print(table(rows, ["run", "s", "RTF"]))
    path = write_result(f"token2wav_{dev.type}{'_tiny' if args.shape == 'tiny' else ''}.json", result)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
