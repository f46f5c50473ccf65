"""CUDA graphs for runs of transformer blocks (without them the engine loop is bound by the host
launching a few thousand small kernels per step).

The runner asks for block ranges: ``[0, L)`` on uncached steps, ``[0, 1)`` and ``[1, L)`` on
step-cached ones (whose row subsets vary per step). A graph is captured lazily per (range, row
bucket, caption bucket, shapes) the first time it is seen, then replayed. Rows are padded up to a
bucket (1, 2, 4, 8, then multiples of 8) and, for families with caption masks, caption tokens
up to a multiple of 64 (also for a family that masks only captions of differing lengths, so that
one graph serves every prompt length); padded caption positions are masked out (-10000, as diffusers masks),
padded rows are computed and dropped. A family that packs its caption stream's GEMMs (``text_lens`` in the
state: ``caption_pack.py``) gets the pack of the padded batch as a graph input, its size part of the key.
Graphs of the same shapes share their input buffers and
all graphs share one memory pool; outputs are copied out right after each replay. A shape whose
capture fails runs eagerly from then on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from omni_ray.capture_lock import capture_lock
from omni_ray.dit.caption_pack import cached_positions
from omni_ray.dit.families.base import BlockState, DiTFamily

log = logging.getLogger(__name__)

CAPTION_MULTIPLE = 64


def record_graph(body, pool=None, warm=None, warmups: int = 2):
    """``body()`` captured as a CUDA graph: (the graph, what ``body`` returned: its static outputs). First
    ``warmups`` runs of ``warm`` (default ``body``) on a side stream, so autotuning, cuDNN's algorithm choice
    and allocations happen outside the capture; then the capture under the process's capture lock, in
    thread-local mode (other threads' CUDA work, an AR engine in the same process, stays legal), in ``pool``
    (None: a new one, ``graph.pool()``). Captured on the thread's current stream where that is an engine's own
    (``cuda_stream``: a green context's stream keeps its graphs on its SMs; a graph captured elsewhere and replayed
    there runs on every SM), else on torch's capture stream. Raises what a failed capture raises."""
    warm = warm or body
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmups):
            warm()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    on = current if current != torch.cuda.default_stream() else None
    with capture_lock(), torch.cuda.graph(graph, pool=pool, stream=on, capture_error_mode="thread_local"), \
            torch.no_grad():
        out = body()
    return graph, out


def row_bucket(rows: int, max_rows: int) -> int | None:
    for b in (1, 2, 4, 8):
        if rows <= b:
            return b if b <= max_rows else None
    b = -(-rows // 8) * 8
    return b if b <= max_rows else None


@dataclass
class _IO:
    x: torch.Tensor                  # [R, N, D]
    ctx: torch.Tensor                # [R, T, D]
    bias: torch.Tensor | None        # [R, 1, T]
    temb: torch.Tensor               # [R, *]
    pack: torch.Tensor | None = None     # [P] flat caption positions (caption packing)
    pack_of: tuple | None = None         # the (lengths, T, rows, multiple) the pack holds now


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    io: _IO
    x: torch.Tensor                  # outputs
    ctx: torch.Tensor


class GraphedBlocks:
    def __init__(self, family: DiTFamily, max_rows: int):
        self.family = family
        self.max_rows = max_rows
        self.ios: dict[tuple, _IO] = {}
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: set[tuple] = set()
        self.pool = None
        self.replays = 0

    def forward(self, x, t, ctx, bias, pooled, shapes) -> None:
        """Whole-forward graphs: none here (block runs only; see token2wav_graphs.py for one that has them)."""
        return None

    def run(self, st: BlockState, lo: int, hi: int) -> bool:
        """Run blocks ``[lo, hi)`` on ``st`` in place through a graph; False: the caller runs them."""
        rows, T = st.x.shape[0], st.ctx.shape[1]
        R = row_bucket(rows, self.max_rows)
        if R is None or rows == 0:
            return False
        bias = st.ctx_bias
        if bias is None and self.family.supports_caption_mask and T % CAPTION_MULTIPLE:
            # a family that masks captions only when they differ (Qwen-Image): pad to the bucket under a
            # mask rather than capture a graph per caption length
            bias = torch.zeros(rows, 1, T, dtype=st.x.dtype, device=st.x.device)
        Tp = -(-T // CAPTION_MULTIPLE) * CAPTION_MULTIPLE if bias is not None else T
        pack_of = (st.text_lens, Tp, R, self.family.pack_multiple)
        pack = cached_positions(*pack_of) if st.text_lens is not None and bias is not None else None
        io_key = (R, Tp, *st.x.shape[1:], *st.ctx.shape[2:], *st.temb.shape[1:], bias is not None,
                  st.grid, st.shapes, st.caption_holes, None if pack is None else len(pack))
        key = (lo, hi, *io_key)
        if key in self.failed:
            return False
        io = self.ios.get(io_key) or self._io(io_key, st, R, Tp, bias)
        io.x[:rows].copy_(st.x)
        io.ctx[:rows, :T].copy_(st.ctx)
        io.temb[:rows].copy_(st.temb)
        if io.bias is not None:
            io.bias[:rows, :, :T].copy_(bias)
            io.bias[:rows, :, T:].fill_(-10000.0)
        if io.pack is not None and io.pack_of != pack_of:   # a new batch geometry (a pinned source: no wait)
            io.pack.copy_(torch.tensor(pack, dtype=torch.long, pin_memory=io.pack.is_cuda), non_blocking=True)
            io.pack_of = pack_of
        g = self.graphs.get(key) or self._capture(key, io, st.grid, st.shapes, lo, hi, st.caption_holes)
        if g is None:
            return False
        g.graph.replay()
        self.replays += 1
        st.x = g.x[:rows].clone()
        if g.ctx is not io.ctx:                      # blocks that update the caption stream (MMDiT)
            st.ctx = g.ctx[:rows, :T].clone()
        return True

    def _io(self, io_key, st: BlockState, R: int, Tp: int, bias: torch.Tensor | None) -> _IO:
        def z(shape, like):
            return torch.zeros(shape, dtype=like.dtype, device=like.device)
        io = _IO(x=z((R, *st.x.shape[1:]), st.x), ctx=z((R, Tp, *st.ctx.shape[2:]), st.ctx),
                 bias=None if bias is None else z((R, 1, Tp), bias),
                 temb=z((R, *st.temb.shape[1:]), st.temb),
                 pack=None if io_key[-1] is None else torch.zeros(io_key[-1], dtype=torch.long, device=st.x.device))
        self.ios[io_key] = io
        return io

    def _capture(self, key, io: _IO, grid, shapes, lo: int, hi: int, holes: bool = False) -> _Graph | None:
        fam = self.family

        def body():
            s = BlockState(x=io.x, ctx=io.ctx, ctx_bias=io.bias, temb=io.temb, emb=io.temb, grid=grid, shapes=shapes,
                           text_pack=io.pack, caption_holes=holes)
            for i in range(lo, hi):
                fam.run_block(i, s)
            return s.x, s.ctx

        try:
            graph, (x, ctx) = record_graph(body, self.pool)
        except Exception as err:                # this shape stays eager
            log.warning("CUDA graph capture failed for %s, running it eagerly: %r", key, err)
            self.failed.add(key)
            return None
        if self.pool is None:
            self.pool = graph.pool()
        g = _Graph(graph=graph, io=io, x=x, ctx=ctx)
        self.graphs[key] = g
        return g
