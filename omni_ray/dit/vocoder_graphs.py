"""token2wav's BigVGAN vocoder (transformers' ``Qwen2_5OmniToken2WavBigVGANModel``, the family's ``vae``) as
CUDA graphs, one per (row bucket, exact mel length).

Eager, the 7B checkpoint's vocoder takes 33-46 ms per streamed chunk on an H100 (~100 ms where the thinker's
and talker's threads compete for the GIL in the same process): hundreds of small kernels (anti-aliased snake
activations around every convolution), bound by the host launching them. A streamed utterance's mels come in
few lengths (chunk 0: ``first_chunk_frames``; chunk 1; every middle chunk: 72 frames after the previous one's
last 40 = 112; the last chunk: any length) and ``VocoderBatcher`` already groups equal lengths, so each
(rows, length) is captured once and replayed.

* Rows are padded with zero mels up to ``row_bucket`` (1, 2, 4, 8, then multiples of 8, up to the bucket of
  ``vae_batch_size``): every op is per row, padded rows are computed and dropped. The time axis is NEVER
  padded: the vocoder is convolutional (replicate-padded anti-aliasing filters, convolutions reaching past the
  ends), padding would change a mel's last samples, so the length is exact.
* Which shapes get graphs (``ShapeBudget``): a shape is captured the second time it is seen (the plan's chunk
  lengths recur within an utterance and across streams; the last chunk's length varies per utterance and
  mostly runs eagerly rather than spend a capture on a shape seen once), and at most ``max_graphs`` graphs are
  kept (``token2wav_vocoder_graphs`` in the DiT engine config): capturing another drops the least recently
  replayed one (its memory goes back to the shared pool). Sightings are remembered for the last
  ``max(64, 4 * max_graphs)`` shapes. ``warmup(lengths)`` captures given lengths for one row at once: the
  token2wav stage passes its chunk plan's recurring lengths when it starts, so even the first stream's first
  audio replays a graph, then every length a last chunk can take (``ChunkPlan.last_vocoder_lengths``: 56 for a
  24-frame first chunk, as many as ``max_graphs`` leaves room for): a capture met while serving holds the
  process's capture lock (~110-240 ms at the 7B shape, every engine of the process waits), an utterance's
  last chunk would otherwise meet one the second time its length recurs.
  Mels longer than ``MAX_GRAPH_FRAMES`` (whole utterances: compute-bound, rarely twice
  the same length, large activations), more rows than the largest bucket, the CPU, ``cuda_graphs: false`` and
  ``token2wav_vocoder_graphs: 0`` run eagerly (transformers' forward, as before).
* Capture follows the project's pattern (token2wav_graphs.py / token2wav_ode.py): two warm-up runs on a side
  stream (cuDNN's algorithm choice, allocations), then the capture under ``capture_lock()`` with
  ``capture_error_mode="thread_local"`` into the memory pool every token2wav graph shares
  (``Token2WavGraphs.pool``); a failed capture is logged and that shape runs eagerly from then on. Outputs are
  copied to the host right after each replay (the next replay overwrites them), on the engine's worker thread
  (``run_between_steps`` / the step that finishes whole utterances), never while another token2wav graph runs.
* Precision (``token2wav_vocoder_precision``; NOT the DiT's ``token2wav_precision``): ``fp32`` (the default, the
  reference's; on CUDA its convolutions are cuDNN's, TF32 where torch's default ``torch.backends.cudnn.allow_tf32``
  allows, exactly as transformers' eager forward runs them) or ``bf16`` (bfloat16 autocast, the waveform
  float32). A vocoder error goes straight into the samples (bf16: relative rms ~6e-2 on the tiny checkpoint on
  the CPU, where a mel's 1e-3 is inaudible) and its time is launches, not arithmetic, so it stays opt-in;
  tests/dit/test_vocoder_graphs.py measures it on the GPU.

The graph body (``vocode``) is transformers' ``forward`` without its host copy (``.squeeze().cpu()``) and with
the mel's dB floor as a device tensor made once (its ``torch.tensor(..., device=...)`` per call is a
host-to-device copy, which a capture cannot hold); the CPU tests check that it equals ``vae(mel)`` exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from omni_ray.devices import to_device
from omni_ray.dit.cuda_graphs import record_graph, row_bucket

log = logging.getLogger(__name__)

MAX_GRAPH_FRAMES = 1024          # mel frames (~10 s of audio); longer mels run eagerly
CAPTURE_AFTER = 2                # a shape is captured on its second sighting


class ShapeBudget:
    """Which shapes get a graph: captured on the ``capture_after``-th sighting, at most ``max_graphs`` kept
    (``VocoderGraphs`` drops the least recently used); sightings counted for the most recent shapes only."""

    def __init__(self, max_graphs: int, capture_after: int = CAPTURE_AFTER):
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.seen: OrderedDict[tuple, int] = OrderedDict()      # shape -> sightings, most recent last
        self.max_seen = max(64, 4 * max_graphs)

    def sight(self, key: tuple, held: bool) -> bool:
        """Count a sighting of ``key``; True when it should be captured now (not ``held``, seen enough)."""
        n = self.seen.pop(key, 0) + 1
        self.seen[key] = n
        while len(self.seen) > self.max_seen:
            self.seen.popitem(last=False)
        return not held and self.max_graphs > 0 and n >= self.capture_after


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    mel: torch.Tensor            # [R, mel_dim, T]  static input (rows past the call's: zeros)
    out: torch.Tensor            # [R, T * hop]     static output


class VocoderGraphs:
    """The family's vocoder path (``Qwen2_5OmniToken2WavFamily.decode`` calls ``decode``).

    ``capture``: CUDA graphs (the engine: CUDA with ``cuda_graphs``); ``forwards``: the ``Token2WavGraphs``
    whose memory pool every token2wav graph shares (None: a pool of its own)."""

    def __init__(self, family, max_rows: int, capture: bool, max_graphs: int = 16, precision: str = "fp32",
                 forwards=None):
        self.family = family
        self.vae = family.vae
        self.max_rows = row_bucket(max_rows, 1 << 30)       # the bucket that holds vae_batch_size rows
        self.capture = capture and max_graphs > 0
        self.precision = precision
        self.forwards = forwards
        self.budget = ShapeBudget(max_graphs)
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()    # (R, T) -> graph, least recently used first
        self.failed: set[tuple] = set()
        self.pool = None                                    # without ``forwards``: this object's own pool
        self.replays = 0                                    # graph replays
        self.captures = 0                                   # graphs captured (dropped ones included)
        self.eager_runs = 0                                 # vocoder batches run eagerly
        self._lock = threading.Lock()                       # the static buffers: one decode at a time
        # amplitude_to_db's floor (-115 dB) as transformers makes it (float32 exp on the mel's device), once
        self._min_level = torch.exp(torch.tensor(-115 / 20.0 * math.log(10), device=family.device,
                                                 dtype=torch.float32))

    # ------------------------------------------------------------------ which path
    def key(self, rows: int, frames: int) -> tuple | None:
        """(row bucket, frames): the graph's shape for ``rows`` mels of ``frames`` frames; None: eager."""
        if not self.capture or rows < 1 or frames > MAX_GRAPH_FRAMES:
            return None
        R = row_bucket(rows, self.max_rows)
        return None if R is None else (R, frames)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Mels [B, T, mel] (any device) -> waveforms [B, T * hop] float32 on the CPU (in [-1, 1])."""
        rows, frames = latents.shape[:2]
        key = self.key(rows, frames)
        if key is None:
            return self._eager(latents)
        with self._lock:
            g = self.graphs.get(key)
            if self.budget.sight(key, held=g is not None) and key not in self.failed:
                g = self._capture(key, latents)
            if g is None:
                return self._eager(latents)
            self.graphs.move_to_end(key)
            self._fill(g.mel, latents)
            g.graph.replay()
            self.replays += 1
            return self._host(g.out[:rows])

    @torch.no_grad()
    def warmup(self, lengths, rows: int = 1) -> int:
        """Capture the shapes of ``rows`` mels of each of ``lengths`` frames now, in the given order, while the
        graphs kept stay within ``max_graphs`` (none dropped for it); returns the number captured. The token2wav
        stage, when it starts: its chunk plan's recurring lengths, then every length a last chunk can take."""
        n = 0
        with self._lock:
            for T in dict.fromkeys(lengths):
                key = self.key(rows, T)
                if key is None or key in self.graphs or key in self.failed:
                    continue
                if len(self.graphs) >= self.budget.max_graphs:
                    break
                mel = torch.zeros(rows, T, self.family.mel_dim, device=self.family.device)
                n += self._capture(key, mel) is not None
        return n

    def _eager(self, latents: torch.Tensor) -> torch.Tensor:
        self.eager_runs += 1
        mel = to_device(latents, self.family.device, torch.float32).permute(0, 2, 1)
        if self.precision == "fp32":
            wave = self.vae(mel)                           # transformers' forward: [samples] when B == 1, on the CPU
            return wave.reshape(latents.shape[0], -1).float().cpu()
        return self._host(self._vocode(mel))

    @staticmethod
    def _host(wave: torch.Tensor) -> torch.Tensor:
        return wave.cpu() if wave.device.type != "cpu" else wave.clone()

    @staticmethod
    def _fill(buf: torch.Tensor, latents: torch.Tensor) -> None:
        rows = latents.shape[0]
        buf[:rows].copy_(to_device(latents, buf.device).permute(0, 2, 1))     # streamed mels come from the host
        buf[rows:].zero_()

    # ------------------------------------------------------------------ the body
    def _precision(self):
        if self.precision == "bf16":
            return torch.autocast(self.family.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _vocode(self, mel: torch.Tensor) -> torch.Tensor:
        with self._precision():
            return vocode(self.vae, mel, self._min_level).float()

    # ------------------------------------------------------------------ capture
    def _capture(self, key: tuple, latents: torch.Tensor) -> _Graph | None:
        """A graph for ``key`` (its static input filled with ``latents``), kept within the bound; None: failed."""
        R, T = key
        try:
            mel = torch.zeros(R, self.family.mel_dim, T, dtype=torch.float32, device=self.family.device)
            self._fill(mel, latents)
            graph, out = self._record(mel)
        except Exception as err:                            # this shape stays eager
            log.warning("token2wav vocoder CUDA graph capture failed for (rows, frames) %s, running it eagerly: %r",
                        key, err)
            self.failed.add(key)
            return None
        while len(self.graphs) >= self.budget.max_graphs:  # drop the least recently replayed
            self.graphs.popitem(last=False)
        g = self.graphs[key] = _Graph(graph=graph, mel=mel, out=out)
        self.captures += 1
        return g

    def _record(self, mel: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """(the vocoder captured on the static input ``mel``, its static output)."""
        pool_owner = self.forwards if self.forwards is not None else self
        graph, out = record_graph(lambda: self._vocode(mel), pool_owner.pool)
        if pool_owner.pool is None:
            pool_owner.pool = graph.pool()                  # one pool for every token2wav graph
        return graph, out


def vocode(vae, mel: torch.Tensor, min_level: torch.Tensor) -> torch.Tensor:
    """transformers' ``Qwen2_5OmniToken2WavBigVGANModel.forward`` on mels [B, mel, T] -> [B, T * hop] on their
    device: the same ops in the same order, without the host copy, with the dB floor ``min_level`` given
    (capturable)."""
    amplitude = torch.exp(mel)                                              # process_mel_spectrogram
    decibel = 20 * torch.log10(torch.clamp(amplitude, min=min_level)) - 20  # amplitude_to_db(-115) - 20
    h = vae.conv_pre(vae.normalize_spectrogram(decibel, 1, -115))
    n = vae.num_residual_blocks
    for i in range(vae.num_upsample_layers):
        h = vae.ups[i][0](h)
        h = sum(vae.resblocks[i * n + j](h) for j in range(n)) / n
    h = vae.conv_post(vae.activation_post(h))
    return torch.clamp(h, min=-1.0, max=1.0)[:, 0]
