"""Chunked (streamed) token2wav: audio for a chunk of codec tokens with its left / right context,
as Qwen2.5-Omni's own streaming code2wav does (Qwen's ``Qwen2Code2wav``, kept by vLLM-Omni as
``Qwen2_5OmniToken2WavModel.process_little_chunk`` / ``_process_chunk_for_50hz``).

The utterance's initial noise ``y_all`` is drawn once per stream; chunk ``i`` owns mel frames
``[i * chunk, (i + 1) * chunk)`` and runs the ODE on the window
``[i * chunk - past, (i + 1) * chunk + future)`` (clipped) with that window's codes and noise, as
one ordinary speech request on the DiT engine (so chunks of many streams share forwards). Its mel
is vocoded together with the previous chunk's last ``2 * overlap`` frames and ``overlap`` frames'
worth of samples are cut at each inner edge, so the pieces join without a seam.

50 Hz codes (``repeats`` 2): chunk 72 mel frames (3 DiT blocks of 24), past 48 (2 blocks: the
look-back of the checkpoint's layers), future 24 (1 block: its look-ahead), overlap 20.

A low-latency first chunk (``token2wav_stream`` in the DiT engine config, as streaming TTS servers start
with a small initial chunk): chunk 0 owns ``[0, first)`` with a look-ahead of ``first_future`` (possibly 0),
so its window runs once ``(first + first_future) / repeats`` codes exist; chunk 1 owns the frames up to the
reference's next chunk boundary (the first multiple of ``chunk`` at least one DiT block past ``first``) and
every later chunk is the reference's (72 frames, 48 back, 24 ahead). From the chunk whose window and vocoder
input no longer reach chunk 0's frames, the windows and audio are the reference plan's. Windows start on
a DiT block boundary of the utterance (the block mask counts blocks from a window's start), and a first
chunk must own more frames than the vocoder overlap its piece is cut by (else ``ConfigError``).

The windows are not exact: each of the ``4 * (num_steps - 1)`` evaluations of the flow lets a frame
see one more block of context each way, so frames near a window's edge miss context the
whole-utterance ODE has. The difference to ``generate`` on the whole utterance is measured by
tests/dit/test_omni_token2wav_chunks.py (see docs/architecture.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from omni_ray.dit.params import DiffusionParams
from omni_ray.dit.speech import SpeechInput
from omni_ray.errors import ConfigError


@dataclass(frozen=True)
class ChunkPlan:
    repeats: int          # mel frames per codec token
    chunk: int            # mel frames a chunk owns (after the first)
    past: int             # left context (mel frames)
    future: int           # right context (mel frames)
    overlap: int          # vocoder overlap (mel frames) at each inner edge
    hop: int              # waveform samples per mel frame
    block: int = 24       # the DiT's attention block (mel frames): windows start on its multiples
    first: int | None = None          # mel frames the first chunk owns (None: ``chunk``, the reference)
    first_future: int | None = None   # the first chunk's right context (None: ``future``)

    def __post_init__(self):
        first, fut = self.first_frames, self.first_lookahead
        if first % self.repeats or fut % self.repeats:
            raise ConfigError(f"token2wav_stream: first_chunk_frames ({first}) and first_lookahead_frames ({fut}) "
                              f"must be multiples of {self.repeats} (mel frames per codec token)")
        if first <= self.overlap:
            raise ConfigError(f"token2wav_stream.first_chunk_frames must exceed the vocoder overlap ({self.overlap} "
                              f"mel frames cut at each inner edge), got {first}: its audio would be empty or "
                              "joined with a seam")
        if fut < 0:
            raise ConfigError(f"token2wav_stream.first_lookahead_frames must be >= 0, got {fut}")

    @classmethod
    def for_family(cls, fam, stream=None) -> "ChunkPlan":
        """The reference's constants for the family's code rate (50 Hz: repeats 2; else 200 Hz-style);
        ``stream`` (the engine config's ``token2wav_stream``, None: the reference's plan): its first chunk."""
        block = 24 if fam.repeats == 2 else 32
        hop = math.prod(fam.vae.config.upsample_rates)
        first = fut = None
        if stream is not None:
            first, fut = stream.first_chunk_frames, stream.first_lookahead_frames
        return cls(fam.repeats, 3 * block, block * fam.repeats, block, 20 if fam.repeats == 2 else 13, hop,
                   getattr(fam, "block_size", block), first, fut)

    @property
    def first_frames(self) -> int:
        return self.chunk if self.first is None else self.first

    @property
    def first_lookahead(self) -> int:
        return self.future if self.first_future is None else self.first_future

    @property
    def second_end(self) -> int:
        """Where chunk 1 ends: the first multiple of ``chunk`` at least one block past the first chunk."""
        return -(-(self.first_frames + self.block) // self.chunk) * self.chunk

    def bounds(self, i: int) -> tuple[int, int]:
        """Mel frames [start, end) chunk ``i`` owns (before clipping to the utterance)."""
        if i == 0:
            return 0, self.first_frames
        end = self.second_end + (i - 1) * self.chunk
        return (self.first_frames if i == 1 else end - self.chunk), end

    def num_chunks(self, frames: int) -> int:
        if frames <= self.first_frames:
            return 1
        return 2 + max(0, -(-(frames - self.second_end) // self.chunk))

    def window(self, i: int, frames: int) -> tuple[int, int]:
        """Mel frames [start, end) of chunk ``i``'s ODE window in an utterance of ``frames``."""
        a, b = self.bounds(i)
        start = max(a - self.past, 0) // self.block * self.block
        return start, min(b + (self.first_lookahead if i == 0 else self.future), frames)

    def longest_window(self, frames: int) -> int:
        """The longest ODE window (mel frames) of an utterance of at most ``frames``: chunk 2's on are all alike."""
        return max(b - a for a, b in (self.window(i, frames) for i in range(3)))

    def ready(self, i: int, num_codes: int, finished: bool) -> bool:
        """Whether chunk ``i`` can run once ``num_codes`` codes are known (all of them when ``finished``)."""
        return finished or self.codes_needed(i) <= num_codes

    def codes_needed(self, i: int) -> int:
        """Codes that make chunk ``i``'s window computable before the utterance ends."""
        b = self.bounds(i)[1] + (self.first_lookahead if i == 0 else self.future)
        return -(-b // self.repeats)

    def is_last(self, i: int, frames: int) -> bool:
        return i == self.num_chunks(frames) - 1

    def head_cut(self, i: int) -> int:
        """Mel frames of the previous chunks chunk ``i`` is vocoded after (up to ``2 * overlap``)."""
        return 0 if i == 0 else min(2 * self.overlap, self.bounds(i)[0])

    def vocoder_frames(self, i: int) -> int:
        """Mel frames chunk ``i`` (not the last) is vocoded from: its own after ``head_cut(i)`` of the previous."""
        a, b = self.bounds(i)
        return self.head_cut(i) + b - a

    def vocoder_lengths(self) -> list[int]:
        """The vocoder input lengths every utterance long enough repeats: chunks 0, 1 and the middle ones
        (the reference's plan: 72 and 112; a 24-frame first chunk: 24, 72, 112). Only the last chunk differs."""
        return sorted({self.vocoder_frames(i) for i in range(3)})

    def last_vocoder_lengths(self) -> list[int]:
        """Every vocoder input length a LAST chunk can have (its own frames, any multiple of ``repeats`` up to
        what the chunk owns, after ``head_cut``): chunk 0 of a short utterance, chunk 1, a later one."""
        out = set()
        for i in range(3):
            a, b = self.bounds(i)
            out.update(self.head_cut(i) + r for r in range(self.repeats, b - a + 1, self.repeats))
        return sorted(out)


class ChunkSplicer:
    """One stream's vocoder state: window mels in chunk order -> waveform pieces that concatenate."""

    def __init__(self, fam, plan: ChunkPlan):
        self.fam, self.plan = fam, plan
        self.prev: torch.Tensor | None = None        # the previous chunk's vocoded mel [T, mel]
        self.next_index = 0

    @torch.no_grad()
    def add(self, i: int, window_mel: torch.Tensor, start: int, last: bool) -> np.ndarray:
        """Chunk ``i``'s window mel [T_window, mel] (its window starting at frame ``start``) -> its
        waveform piece (float32). Chunks come in order."""
        return self.trim(i, last, self.fam.decode(self.vocoder_input(i, window_mel, start, last)[None])[0])

    def vocoder_input(self, i: int, window_mel: torch.Tensor, start: int, last: bool) -> torch.Tensor:
        """The mel [T, mel] chunk ``i``'s audio is vocoded from: its own frames after the previous chunk's
        last ``2 * overlap`` (chunks in order; ``add`` without the vocoder, for callers that batch it)."""
        if i != self.next_index:
            raise ValueError(f"chunk {i} came before chunk {self.next_index}")
        p, m = self.plan, window_mel.float()
        s, e = p.bounds(i)
        own = m[s - start:] if last else m[s - start:e - start]     # (the reference: [past:-future] of a window)
        mel = own if i == 0 else torch.cat([self.prev[len(self.prev) - p.head_cut(i):], own])
        self.prev, self.next_index = mel, i + 1
        return mel

    def trim(self, i: int, last: bool, audio: torch.Tensor) -> np.ndarray:
        """Chunk ``i``'s vocoded samples -> its piece: ``overlap`` frames' worth cut at each inner edge (at
        its start: what it was vocoded after, less ``overlap``)."""
        cut = self.plan.overlap * self.plan.hop
        if i > 0:
            audio = audio[(self.plan.head_cut(i) - self.plan.overlap) * self.plan.hop:]
        if not last:
            audio = audio[:-cut]
        return audio.numpy()


def stream_noise(fam, seed: int, frames: int | None = None) -> torch.Tensor:
    """A stream's initial noise ``y_all`` [frames, mel] (CPU, float32): the reference draws it once for the
    longest utterance (``frames`` None: the DiT's position limit), chunks read their windows of it."""
    g = torch.Generator().manual_seed(seed)
    n = frames or fam.max_sequence_length
    return torch.randn([1, n, fam.mel_dim], generator=g, dtype=torch.float32)[0]


class LazyNoise:
    """``stream_noise(fam, seed)`` drawn as far as a stream's frames reach, not all at once: the whole draw is
    ~2.6 M normals at the 7B shape (~10-20 ms of CPU on the event loop, per request: 16 requests at once
    waited ~200 ms for it before their prompts reached the thinker). Torch's CPU normal sampler turns its
    uniforms into normals in blocks of 16 values, in order, so draws of whole blocks in a row equal one draw
    of them all (tests/dit/test_omni_token2wav_chunks.py checks it against ``stream_noise``); every draw but
    the one that reaches the limit is a multiple of 16 frames, and none is shorter than 16 frames."""

    MIN_FRAMES = 256

    def __init__(self, fam, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.limit, self.mel_dim = fam.max_sequence_length, fam.mel_dim
        self.drawn = torch.zeros(0, self.mel_dim)

    def upto(self, frames: int) -> torch.Tensor:
        """The noise's first ``frames`` frames or more [>= frames, mel] (drawing what is missing)."""
        have = self.drawn.shape[0]
        if frames > have:
            want = max(frames, 2 * have, self.MIN_FRAMES)
            want = min(-(-want // 16) * 16, self.limit)
            if self.limit - want < 16:
                want = self.limit
            more = torch.randn([1, want - have, self.mel_dim], generator=self.gen, dtype=torch.float32)[0]
            self.drawn = torch.cat([self.drawn, more])
        return self.drawn


class SpeechStream:
    """One utterance synthesized chunk by chunk while its codes arrive (the streamed token2wav stage).

        stream = SpeechStream(engine.family, voice="Chelsie", seed=0)
        for window in stream.push(new_codes, finished):       # the chunks now computable, in order
            mel = <a speech request of window.speech with output_type="latent">
            audio_piece = stream.audio(window, mel)            # float32 samples, in chunk order
    """

    def __init__(self, fam, voice: str | None = None, seed: int = 0, sway_coefficient: float | None = -1.0,
                 noise: torch.Tensor | None = None, plan: ChunkPlan | None = None):
        self.fam, self.plan = fam, plan or ChunkPlan.for_family(fam)
        self.voice, self.sway = fam.resolve_voice(voice), sway_coefficient     # InvalidRequestError(param="voice")
        self.lazy = LazyNoise(fam, seed) if noise is None else None
        self.noise = noise
        self.noise_frames = fam.max_sequence_length if noise is None else noise.shape[0]
        self.codes = torch.zeros(0, dtype=torch.long)
        self.finished = False
        self.next_chunk = 0
        self.splicer = ChunkSplicer(fam, self.plan)

    def push(self, codes, finished: bool = False) -> list["ChunkWindow"]:
        """Add codes (a possibly empty list / 1-D tensor); returns the windows that became computable."""
        if self.finished:
            raise ValueError("the stream is finished")
        if len(codes):
            self.codes = torch.cat([self.codes, self.fam.check_codes(codes)])
        self.finished = finished
        frames = self.codes.shape[0] * self.plan.repeats
        if frames > self.noise_frames:
            raise ValueError(f"{frames} mel frames exceed the stream's noise ({self.noise_frames} frames)")
        if self.lazy is not None:
            self.noise = self.lazy.upto(frames)
        out = []
        while frames and self.next_chunk < self.plan.num_chunks(frames) and \
                self.plan.ready(self.next_chunk, self.codes.shape[0], finished):
            i = self.next_chunk
            a, b = self.plan.window(i, frames)
            r = self.plan.repeats
            out.append(ChunkWindow(i, a, finished and self.plan.is_last(i, frames),
                                   SpeechInput(self.codes[a // r:b // r], self.voice, self.sway, self.noise[a:b],
                                               first=i == 0)))
            self.next_chunk += 1
        return out

    def audio(self, window: "ChunkWindow", mel: torch.Tensor) -> np.ndarray:
        """The window's mel [T_window, mel] -> its waveform piece (windows in order)."""
        return self.splicer.add(window.index, mel, window.start, window.last)

    def vocoder_input(self, window: "ChunkWindow", mel: torch.Tensor) -> torch.Tensor:
        """``audio`` in two halves, for a caller that vocodes many streams' mels together
        (omni_ray/dit/vocoder_batch.py): the mel to vocode (windows in order), then ``trim``."""
        return self.splicer.vocoder_input(window.index, mel, window.start, window.last)

    def trim(self, window: "ChunkWindow", audio: torch.Tensor) -> np.ndarray:
        """The vocoded samples of ``vocoder_input(window, ...)`` -> the window's waveform piece."""
        return self.splicer.trim(window.index, window.last, audio)


@dataclass
class ChunkWindow:
    index: int
    start: int                 # the window's first mel frame in the utterance
    last: bool
    speech: SpeechInput        # the window's codes and noise: one speech request


def synthesize_chunked(engine, codes, voice: str | None, params: DiffusionParams, noise: torch.Tensor,
                       sway_coefficient: float | None = -1.0, plan: ChunkPlan | None = None) -> list[np.ndarray]:
    """A whole utterance chunk by chunk on ``engine`` (all windows in one batch): the waveform pieces,
    in order. ``noise``: the stream's ``y_all`` (at least ``len(codes) * repeats`` frames); ``plan``: None,
    the reference's chunks."""
    stream = SpeechStream(engine.family, voice, sway_coefficient=sway_coefficient, noise=noise, plan=plan)
    windows = stream.push(codes, finished=True)
    mels = engine.generate(params=params, speech=[w.speech for w in windows], output_type="latent", use_tqdm=False)
    return [stream.audio(w, mel) for w, mel in zip(windows, mels)]
