"""Whole token2wav DiT forwards (embedding, every block, output projection) as CUDA graphs.

Eager, one forward of the Qwen2.5-Omni-7B shape takes ~28 ms whatever its length: 22 blocks of small
ops, bound by the host launching kernels. Here a forward is captured once per (row bucket, frame
bucket) and replayed. Rows are padded up to a bucket (1, 2, 4, 8, then multiples of 8, as the
block-run graphs pad them) and mel frames up to a multiple of two attention blocks (48 frames for
the checkpoint's 24-frame blocks) up to 16 blocks, then of 8 blocks; a streamed window of 144
frames and a whole utterance of 400 share few shapes. Padding is exact by construction: the family
already right-pads rows of mixed lengths and its attention drops a real query's padded keys (every
other op is per frame), so padded frames and padded rows are computed and dropped.

Longer inputs than ``MAX_GRAPH_FRAMES`` (compute-bound anyway), a shape whose capture fails, and
engines without CUDA graphs run eagerly; with ``pad`` the eager path pads as the graphs do (the CPU
tests check that it equals the unpadded forward). ``precision`` "bf16" runs the forward under
bfloat16 autocast (the mel stays float32) on a copy of the transformer with bf16 linears
(``bf16_linears``), "tf32" with TF32 float32 matmuls; "fp32" is the reference. ``fused`` runs the forward as
``Token2WavBlocks`` (stacked weights, fewer kernels per block: families/qwen2_5_omni_token2wav_block.py), else
layer by layer as transformers' model does.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch

from omni_ray.dit.cuda_graphs import record_graph, row_bucket

log = logging.getLogger(__name__)

MAX_GRAPH_FRAMES = 4096        # mel frames (~41 s of audio); longer forwards run eagerly


@contextlib.contextmanager
def _tf32_matmuls():
    """TF32 float32 matmuls while the forward runs or is captured (a graph keeps the kernels it captured).
    torch's switch is process-wide: a float32 CUDA matmul of another thread in this window uses TF32 too
    (the AR engines run bf16 / fp16, which it does not touch)."""
    m = torch.backends.cuda.matmul
    prev = m.allow_tf32
    m.allow_tf32 = True
    try:
        yield
    finally:
        m.allow_tf32 = prev


def frame_bucket(frames: int, block_size: int) -> int:
    """``frames`` rounded up to a multiple of 2 blocks (up to 16 blocks), then of 8 blocks."""
    step = 2 * block_size if frames <= 16 * block_size else 8 * block_size
    return -(-frames // step) * step


@dataclass
class _IO:
    x: torch.Tensor                  # [R, Tp, mel]  noisy mels
    t: torch.Tensor                  # [R]           times
    ctx: torch.Tensor                # [R, Tp, C]    conditioning columns
    lengths: torch.Tensor            # [R]           real frames per row (0: a padded row)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    io: _IO
    out: torch.Tensor                # [R, Tp, mel]  the prediction


def bf16_linears(family):
    """The family as ``precision: bf16`` runs it: a shallow copy whose transformer is a copy with every
    ``nn.Linear`` in bfloat16 (norms, embeddings and the rest as loaded). Under bf16 autocast a float32 linear
    casts its weight and bias on every call, two copy kernels per layer per forward (~36 forwards per window's
    ODE); these weights are the same casts, made once. The loaded family is not touched (engines of other
    precisions may share it); its compiled blocks are compiled again over the copy."""
    fam = copy.copy(family)
    fam.transformer = copy.deepcopy(family.transformer)
    for m in fam.transformer.modules():
        if isinstance(m, torch.nn.Linear):
            m.to(torch.bfloat16)
    fam.block_fns = list(fam.transformer.transformer_blocks)
    if any(f is not b for f, b in zip(family.block_fns, family.transformer.transformer_blocks)):
        fam.compile()                                      # family.compile() ran: compile the copy's blocks too
    return fam


class Token2WavGraphs:
    """The DiT runner's whole-forward hook for speech families (``DiTRunner`` calls ``forward``)."""

    def __init__(self, family, max_rows: int, capture: bool, pad: bool | None = None, precision: str = "fp32",
                 fused: bool = True, compile: bool = False):
        self.family = family
        self.forward_family = bf16_linears(family) if precision == "bf16" else family    # what _forward runs
        self.blocks = None               # Token2WavBlocks: the forward with stacked weights (``fused``)
        if fused:
            from omni_ray.dit.families.qwen2_5_omni_token2wav_block import Token2WavBlocks
            self.blocks = Token2WavBlocks(self.forward_family.transformer, family._block_diff, compile=compile)
        self.max_rows = max_rows
        self.capture = capture
        self.pad = capture if pad is None else pad
        self.precision = precision
        self.ios: dict[tuple, _IO] = {}
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: set[tuple] = set()
        self.pool = None
        self.replays = 0                 # graph replays
        self.padded_eager = 0            # padded forwards run eagerly (capture off, failed or too long)
        self.ode = None                  # Token2WavODE: whole ODEs in one engine step (omni_ray/dit/token2wav_ode.py)

    def _precision(self):
        if self.precision == "bf16":
            return torch.autocast(self.family.device.type, dtype=torch.bfloat16, cache_enabled=False)
        if self.precision == "tf32":
            return _tf32_matmuls()
        return contextlib.nullcontext()

    def prepare(self, ctx: torch.Tensor, lengths: torch.Tensor | None, times: torch.Tensor | None = None):
        """What every forward over these columns shares (``Token2WavBlocks.prepare``; ``times`` [E, R]: every
        evaluation's; None when not fused)."""
        if self.blocks is None:
            return None
        with self._precision():
            return self.blocks.prepare(ctx, lengths, times)

    def _forward(self, x, t, ctx, lengths, prepared=None, step: int | None = None) -> torch.Tensor:
        """One forward (``prepared``: ``prepare(ctx, lengths, times)`` already made for these columns; ``step``:
        which of its times ``t`` is)."""
        with self._precision():
            if self.blocks is not None:
                return self.blocks.forward(x, t, prepared or self.blocks.prepare(ctx, lengths), step)
            return self.forward_family.forward(x, t, ctx, lengths, None).float()    # ctx_bias: the rows' lengths

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, lengths: torch.Tensor | None,
                pooled=None, shapes=()) -> torch.Tensor:
        """The prediction [rows, T, mel] for the runner's stacked inputs (``lengths``: the batch's
        ``ctx_bias``, None when all rows are T frames long)."""
        rows, T = x.shape[:2]
        R = row_bucket(rows, self.max_rows)
        Tp = frame_bucket(T, self.family.block_size)
        if not self.pad or R is None or Tp > MAX_GRAPH_FRAMES:
            return self._forward(x, t, ctx, lengths)
        io = self.ios.get((R, Tp)) or self._io(R, Tp, x, ctx)
        io.x[:rows, :T].copy_(x)
        io.x[:rows, T:].zero_()
        io.ctx[:rows, :T].copy_(ctx)
        io.ctx[:rows, T:].zero_()
        io.t[:rows].copy_(t)
        if lengths is None:
            io.lengths[:rows].fill_(T)
        else:
            io.lengths[:rows].copy_(lengths)
        io.lengths[rows:].zero_()
        key = (R, Tp)
        g = None
        if self.capture and key not in self.failed:
            g = self.graphs.get(key) or self._capture(key, io)
        if g is None:
            self.padded_eager += 1
            return self._forward(io.x, io.t, io.ctx, io.lengths)[:rows, :T]
        g.graph.replay()
        self.replays += 1
        return g.out[:rows, :T].clone()          # the next replay overwrites g.out

    def run(self, st, lo: int, hi: int) -> bool:
        """Block-run graphs (``GraphedBlocks``' hook): none here, whole forwards only."""
        return False

    def _io(self, R: int, Tp: int, x: torch.Tensor, ctx: torch.Tensor) -> _IO:
        dev = x.device
        io = _IO(x=torch.zeros(R, Tp, x.shape[2], dtype=x.dtype, device=dev),
                 t=torch.zeros(R, dtype=torch.float32, device=dev),
                 ctx=torch.zeros(R, Tp, ctx.shape[2], dtype=ctx.dtype, device=dev),
                 lengths=torch.zeros(R, dtype=torch.long, device=dev))
        self.ios[(R, Tp)] = io
        return io

    def _capture(self, key: tuple, io: _IO) -> _Graph | None:
        try:
            graph, out = record_graph(lambda: self._forward(io.x, io.t, io.ctx, io.lengths), self.pool)
        except Exception as err:                # this shape stays eager (padded)
            log.warning("token2wav CUDA graph capture failed for (rows, frames) %s, running it eagerly: %r", key, err)
            self.failed.add(key)
            return None
        if self.pool is None:
            self.pool = graph.pool()
        g = _Graph(graph=graph, io=io, out=out)
        self.graphs[key] = g
        return g
