"""A speech batch's whole ODE in one engine step: every RK4 evaluation, the CFG combination and the RK4
updates, replayed as ONE CUDA graph per (row bucket, frame bucket, num_steps, sway, guidance).

Step by step (omni_ray/dit/runner.py) a window's ODE costs 36 engine steps of host work (stacking inputs,
per-request scheduler steps, graph IO copies); the forwards themselves take ~1 ms each on an H100 at the 7B
shape. Here the requests of a batch that are all at their first evaluation and share (num_steps, sway
coefficient, guidance scale) are integrated to the end at once: their initial noise, conditioning columns
and lengths are copied into static buffers, the captured graph runs ``4 * (num_steps - 1)`` forwards and
their updates, and the final mels are read out. The arithmetic is the step path's, in the same order and
dtype: the forward of ``Token2WavGraphs._forward`` (its ``token2wav_precision``), the family's
``combine_cfg`` on float32 predictions, ``RK4FlowScheduler.step`` itself on the batch (elementwise, so each
row computes what it computes alone). Padded frames enter every forward as zeros, as the runner pads them.

Rows and frames are padded as ``Token2WavGraphs`` pads them (``pad``: on with CUDA graphs); without padding
(CPU, ``cuda_graphs: false``) the same function runs eagerly on the batch's own shape. A failed capture is
logged and that shape runs the same function eagerly. Longer inputs than ``MAX_GRAPH_FRAMES`` with graphs on,
and requests at mixed progress, take the step-by-step path (``partition``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from omni_ray.capture_lock import exclusive_lock
from omni_ray.dit.cuda_graphs import record_graph, row_bucket
from omni_ray.dit.request import DiTRequest
from omni_ray.dit.rk4 import RK4FlowScheduler
from omni_ray.dit.token2wav_graphs import MAX_GRAPH_FRAMES, Token2WavGraphs, frame_bucket

log = logging.getLogger(__name__)


@dataclass
class _IO:
    y0: torch.Tensor                 # [Rq, Tp, mel]  initial noise (padded frames and rows: zeros)
    ctx: torch.Tensor                # [rows, Tp, C]  columns (CFG: every null half, then the requests' own)
    lengths: torch.Tensor            # [rows]         real frames per row (0: a padded row)
    t: torch.Tensor                  # [E, rows]      the evaluation times


@dataclass(frozen=True)
class ODEShape:
    requests: int                    # Rq: requests (rows before CFG doubling), bucketed when padded
    frames: int                      # Tp
    num_steps: int
    sway: float | None
    guidance: float
    cfg: bool

    @property
    def rows(self) -> int:
        return self.requests * (2 if self.cfg else 1)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    io: _IO
    out: torch.Tensor                # [Rq, Tp, mel]  the solution at t = 1


class Token2WavODE:
    """The DiT runner's whole-ODE hook for speech families (``DiTRunner.step`` calls ``partition`` / ``run``)."""

    def __init__(self, graphs: Token2WavGraphs, first_alone: bool = False):
        self.forwards = graphs            # the forward (its precision), the padding rule, the shared graph pool
        self.first_alone = first_alone    # token2wav_first_window_alone: a first window's ODE with AR steps held
        self.alone_runs = 0               # ODEs run alone (their batch held a first window)
        self.family = graphs.family
        self.ios: dict[ODEShape, _IO] = {}
        self.graphs: dict[ODEShape, _Graph] = {}
        self.failed: set[ODEShape] = set()
        self.replays = 0                  # whole-ODE graph replays
        self.eager_runs = 0               # whole ODEs run eagerly (capture off or failed)
        self._warned = False

    # ------------------------------------------------------------------ warm-up
    def warmup(self, engine, longest: int) -> int:
        """Capture now the graph of every shape windows of up to ``longest`` mel frames can take, at the engine's
        default steps: each row bucket up to its ``max_batch_size`` x each frame bucket (``engine``: the
        ``DiTEngine`` this runs in; n silent requests of T frames through ``generate`` meet each shape). A capture
        records every forward of the ODE (~2 s at the 7B shape) under the process's capture lock, so one met
        while serving stalls that window and every engine of the process. No-op without padded captures.
        Returns the number of shapes visited."""
        from omni_ray.dit.params import DiffusionParams
        from omni_ray.dit.speech import SpeechInput

        if not self.forwards.capture or not self.forwards.pad:
            return 0
        fam = self.family
        frames = sorted({frame_bucket(f, fam.block_size) for f in range(fam.repeats, longest + 1, fam.repeats)})
        rows = sorted({b for n in range(1, engine.config.max_batch_size + 1)
                       if (b := row_bucket(n, self.forwards.max_rows)) is not None})
        for n in rows:
            for T in frames:
                codes = torch.zeros(T // fam.repeats, dtype=torch.long)
                engine.generate(params=[DiffusionParams(seed=i) for i in range(n)],
                                speech=[SpeechInput(codes) for _ in range(n)], output_type="latent", use_tqdm=False)
        return len(rows) * len(frames)

    # ------------------------------------------------------------------ which requests
    def partition(self, reqs: list[DiTRequest]) -> tuple[list[list[DiTRequest]], list[DiTRequest]]:
        """(groups whose whole ODE runs now, the requests that take one step-by-step evaluation)."""
        groups: dict[tuple, list[DiTRequest]] = {}
        rest = []
        for r in reqs:
            if r.speech is None or r.cache is not None or r.step_idx != 0 or not self._fits(r):
                rest.append(r)
                continue
            groups.setdefault((r.num_steps, r.speech.sway_coefficient, r.guidance_scale, r.do_cfg), []).append(r)
        return list(groups.values()), rest

    def _fits(self, r: DiTRequest) -> bool:
        return not self.forwards.pad or frame_bucket(r.latents.shape[1], self.family.block_size) <= MAX_GRAPH_FRAMES

    # ------------------------------------------------------------------ one group to its end
    @torch.no_grad()
    def run(self, reqs: list[DiTRequest]) -> int:
        """Integrate the requests' ODE to t = 1 (sets their final ``latents`` and ``step_idx``); returns the
        number of evaluations (forwards) it ran."""
        fam, first = self.family, reqs[0]
        n, T = len(reqs), max(r.latents.shape[1] for r in reqs)
        Rq = row_bucket(n, self.forwards.max_rows) if self.forwards.pad else None
        padded = Rq is not None
        Rq, Tp = (Rq, frame_bucket(T, fam.block_size)) if padded else (n, T)
        shape = ODEShape(Rq, Tp, first.num_steps, first.speech.sway_coefficient,
                         first.guidance_scale if first.do_cfg else 0.0, first.do_cfg)
        io = self._io(shape, first.timesteps, cache=padded)
        self._fill(io, shape, reqs)
        g = None
        if self.forwards.capture and padded and shape not in self.failed:
            g = self.graphs.get(shape) or self._capture(shape, io)
        alone = self.first_alone and any(r.speech.first for r in reqs)
        with exclusive_lock() if alone else contextlib.nullcontext():    # AR engine steps wait for this ODE
            if g is not None:
                g.graph.replay()
                self.replays += 1
                y = g.out
            else:
                y = self._integrate(io, shape)
                self.eager_runs += 1
            if alone and y.is_cuda:
                torch.cuda.current_stream().synchronize()
        self.alone_runs += alone
        for i, r in enumerate(reqs):
            r.latents = y[i:i + 1, :r.latents.shape[1]].clone()     # the next replay overwrites g.out
            r.step_idx = len(r.timesteps)
            r.latents = fam.final_latents(r)
        return len(first.timesteps)

    def _io(self, shape: ODEShape, timesteps: torch.Tensor, cache: bool) -> _IO:
        if shape in self.ios:
            return self.ios[shape]
        fam, dev = self.family, self.family.device
        E = len(timesteps)
        io = _IO(y0=torch.zeros(shape.requests, shape.frames, fam.mel_dim, dtype=torch.float32, device=dev),
                 ctx=torch.zeros(shape.rows, shape.frames, fam.caption_dim, dtype=torch.float32, device=dev),
                 lengths=torch.zeros(shape.rows, dtype=torch.long, device=dev),
                 t=timesteps.to(torch.float32)[:, None].expand(E, shape.rows).contiguous().to(dev))
        if cache:                                          # padded shapes recur; unpadded ones are the batch's own
            self.ios[shape] = io
        return io

    @staticmethod
    def _fill(io: _IO, shape: ODEShape, reqs: list[DiTRequest]) -> None:
        """The requests' noise, columns and lengths into the static buffers (the rest zeroed)."""
        off = shape.requests if shape.cfg else 0
        io.y0.zero_()
        io.ctx.zero_()
        lengths = [0] * shape.rows
        for i, r in enumerate(reqs):
            L = r.latents.shape[1]
            io.y0[i, :L].copy_(r.latents[0])
            io.ctx[off + i, :L].copy_(r.cond.tokens)
            lengths[off + i] = L
            if shape.cfg:
                io.ctx[i, :L].copy_(r.neg_cond.tokens)
                lengths[i] = L
        pin = io.lengths.device.type == "cuda"
        io.lengths.copy_(torch.tensor(lengths, dtype=torch.long, pin_memory=pin), non_blocking=pin)

    def _integrate(self, io: _IO, shape: ODEShape) -> torch.Tensor:
        """The whole ODE on the static buffers (run eagerly, or captured): the step path's arithmetic."""
        fam = self.family
        sched = RK4FlowScheduler(shape.num_steps, shape.sway)
        frames = torch.arange(shape.frames, device=io.y0.device)
        real = (frames[None, :] < io.lengths[-shape.requests:, None])[..., None]     # [Rq, Tp, 1]
        y = io.y0
        prepared = self.forwards.prepare(io.ctx, io.lengths, io.t)     # what the forwards share (fused forward)
        for e in range(len(sched.timesteps)):
            x = torch.where(real, y, 0.0)                 # padded frames enter each forward as zeros
            if shape.cfg:
                x = torch.cat([x, x])                     # the null halves' rows, then the requests' own
            pred = self.forwards._forward(x, io.t[e], io.ctx, io.lengths, prepared, e)
            if shape.cfg:
                uncond, cond = pred.chunk(2)
                pred = fam.combine_cfg(uncond, cond, shape.guidance)
            y = sched.step(fam.model_output(pred), sched.timesteps[e], y)[0]
        return y

    def _capture(self, shape: ODEShape, io: _IO) -> _Graph | None:
        try:
            x = torch.cat([io.y0, io.y0]) if shape.cfg else io.y0
            graph, out = record_graph(lambda: self._integrate(io, shape), self.forwards.pool,   # warmed: one forward
                                      warm=lambda: self.forwards._forward(x, io.t[0], io.ctx, io.lengths))
        except Exception as err:                          # this shape runs the same function eagerly
            self.failed.add(shape)
            if not self._warned:
                log.warning("token2wav whole-ODE CUDA graph capture failed for %s, running it eagerly: %r", shape, err)
                self._warned = True
            else:
                log.debug("token2wav whole-ODE CUDA graph capture failed for %s: %r", shape, err)
            return None
        if self.forwards.pool is None:
            self.forwards.pool = graph.pool()             # one pool for every token2wav graph
        g = _Graph(graph=graph, io=io, out=out)
        self.graphs[shape] = g
        return g
