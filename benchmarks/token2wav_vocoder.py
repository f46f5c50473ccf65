"""bench_token2wav.py's vocoder section: the BigVGAN vocoder's time per call at each mel length and batch size,
eager (transformers' forward, fp32) vs CUDA graphs (omni_ray/dit/vocoder_graphs.py) in fp32 and bf16, and the
graphs' difference to eager (max |diff|) and bf16's to fp32 (relative rms). Mels go in from the host and the
waveforms come back to it, as the token2wav stage vocodes them. Quick: a few lengths x batch sizes, one capture
each, ``repeats`` timed calls (median).
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import Timer
from omni_ray.dit.vocoder_graphs import VocoderGraphs

VOCODER_COLUMNS = ["mel frames", "batch", "eager ms", "graphs ms", "graphs bf16 ms", "speed-up", "eager ms per mel",
           "graphs ms per mel", "capture ms", "graphs max |diff|", "bf16 rel rms"]


def _median_ms(fn, mel, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with Timer() as t:
            fn(mel)
        times.append(t.s)
    return 1000 * float(np.median(times))


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())


@torch.no_grad()
def vocoder_rows(fam, frames: list[int], batches: list[int], repeats: int) -> tuple[list[dict], dict]:
    """(table rows, the JSON's ``vocoder`` entry) for each (mel length, batch size)."""
    graphed = fam.device.type == "cuda"
    top = max(batches)
    eager = VocoderGraphs(fam, top, capture=False)
    fp32 = VocoderGraphs(fam, top, capture=graphed, max_graphs=len(frames) * len(batches))
    bf16 = VocoderGraphs(fam, top, capture=graphed, max_graphs=len(frames) * len(batches), precision="bf16")
    g = torch.Generator().manual_seed(0)
    rows, out = [], {}
    for T in frames:
        for B in batches:
            mel = torch.randn(B, T, fam.mel_dim, generator=g) * 2 - 5           # log-amplitude mels, on the host
            ref = eager.decode(mel)
            e_ms = _median_ms(eager.decode, mel, repeats)
            row = {"mel frames": T, "batch": B, "eager ms": e_ms, "eager ms per mel": e_ms / B}
            if graphed:
                fp32.decode(mel)                                               # first sighting: eager
                with Timer() as cap:
                    wave = fp32.decode(mel)                                    # captured (+ one replay)
                g_ms = _median_ms(fp32.decode, mel, repeats)
                bf16.decode(mel)
                low = bf16.decode(mel)
                b_ms = _median_ms(bf16.decode, mel, repeats)
                row |= {"graphs ms": g_ms, "graphs bf16 ms": b_ms, "speed-up": e_ms / g_ms,
                        "graphs ms per mel": g_ms / B, "capture ms": 1000 * cap.s,
                        "graphs max |diff|": float((wave - ref).abs().max()), "bf16 rel rms": _rel_rms(low, ref)}
            rows.append(row)
            out.setdefault(str(T), {})[str(B)] = {k: v for k, v in row.items() if k not in ("mel frames", "batch")}
    out["graphs"], out["replays"] = len(fp32.graphs), fp32.replays
    return rows, out
