"""CUDA graphs for steps that carry prompt tokens: a prefill, or prompts joining running decodes.

Decode-only steps replay the runner's decode graphs; without this module every other step runs
eagerly, and an eager forward of a small model is bound by the host (~13-20 ms for the
Qwen3-0.6B shape on an H100 whatever the token count, against ~3 ms of device work). Under
serving that is the common step: requests arrive a few at a time and join the running batch.

Here such a step is padded to a bucket of T tokens (16, 32, ... up to ``mixed_graph_tokens``) and
replays the graph captured for T. All sequences, decodes included (query length 1), go through
the paged prefill kernel, whose grid is fixed per bucket: (T / M + S, heads) programs, with M
query rows a program and S the runner's largest graph batch, each reading which (sequence,
query block) it computes from the inputs; the programs past the last block return at once.
Padding tokens write their K/V to the scratch slot. The inputs travel in one packed int32
host->device copy:

    ids [T] | positions [T] | slots [T] | cu_seqlens [S + 1] | context lens [S]
    | rows to sample [S] | block tables [S, max_blocks] | query blocks [T / M + S]
                                                          (T: the largest bucket; parts 64-byte aligned)

The query blocks (sequence << 16 | block of M query rows, -1 past the last) make that grid flat:
a grid of (T / M, S) launched, at T = 2048 and S = 512, 16 k programs per head and layer that
exit at once (a 1.5 k-token step took 13.9 ms, as long as eagerly; flat: 7.7 ms).

The graph ends with the logits of the rows to sample, in the runner's ``g_logits``; the runner
samples from them as from an eager step's. Every token's final hidden state is left in ``g_hidden``
(the runner copies out the rows of sequences that asked for them).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from omni_ray.ar.batch import ScheduledBatch
from omni_ray.ar.kernels.tiling import prefill_block_m
from omni_ray.ar.layers.attention import AttnMetadata
from omni_ray.capture_lock import capture_lock

log = logging.getLogger(__name__)

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def bucket_sizes(limit: int) -> list[int]:
    """Token buckets up to ``limit`` (itself the last bucket when it is not a power of two)."""
    if limit <= 0:
        return []
    return sorted({b for b in BUCKETS if b < limit} | {limit})


class MixedStepGraphs:
    def __init__(self, runner, limit: int):
        self.r = runner
        self.sizes = bucket_sizes(min(limit, runner.cfg.scheduler.max_num_batched_tokens))
        self.t_max, self.s = self.sizes[-1], runner.max_graph_bs
        self.w = runner.max_blocks
        # offsets of the packed input's parts, each 64-byte aligned (Triton specializes on alignment)
        up = lambda x: -(-x // 16) * 16                                  # noqa: E731
        self.T = up(self.t_max)                                          # room per token part
        s, t = self.s, self.T
        self.o_cu = 3 * t
        self.o_ctx = up(self.o_cu + s + 1)
        self.o_rows, self.o_bt = up(self.o_ctx + s), up(self.o_ctx + s) + up(s)
        self.m = prefill_block_m(runner.arch.head_dim)
        self.nqb = -(-self.t_max // self.m) + s                          # at most one partial block per sequence
        self.o_qb = up(self.o_bt + s * self.w)
        n = self.o_qb + self.nqb
        dev = runner.device
        self.h_in = torch.zeros(n, dtype=torch.int32, pin_memory=dev.type == "cuda")
        self.h = self.h_in.numpy()
        self.g_in = torch.zeros(n, dtype=torch.int32, device=dev)
        self.g_hidden = torch.zeros(self.T, runner.arch.hidden_size, dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0

    def covers(self, batch: ScheduledBatch) -> bool:
        return len(batch.seqs) <= self.s and batch.num_tokens <= self.t_max

    # ------------------------------------------------------------------ capture
    def capture(self, pool=None):
        """One graph per bucket (largest first, sharing ``pool``); returns the pool."""
        self._fill_empty()
        self.g_in.copy_(self.h_in)
        for t in reversed(self.sizes):
            for _ in range(2):                    # warm up: kernels compile and autotune outside the capture
                self._body(t)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with capture_lock(), torch.cuda.graph(g, pool=pool, stream=self.r.stream):
                self._body(t)
            pool = g.pool()
            self.graphs[t] = g
        torch.cuda.synchronize()
        log.info("captured %d prefill / mixed-step CUDA graphs (up to %d tokens, %d sequences)",
                 len(self.sizes), self.t_max, self.s)
        return pool

    def _fill_empty(self) -> None:
        """No sequence (every query length 0); padding tokens aimed at the scratch slot."""
        h, t = self.h, self.T
        h[:] = 0
        h[2 * t:3 * t] = self.r.scratch_slot
        h[self.o_qb:] = -1

    def _body(self, t: int) -> None:
        """The forward of bucket ``t`` on the packed inputs; the logits of the rows to sample."""
        g, T, s, r = self.g_in, self.T, self.s, self.r
        ids, pos, slots = g[:t].long(), g[T:T + t].long(), g[2 * T:2 * T + t].long()
        table = g[self.o_bt:self.o_bt + s * self.w].view(s, self.w)
        meta = AttnMetadata(slot_mapping=slots, context_lens=g[self.o_ctx:self.o_ctx + s],
                            block_tables=table, cu_seqlens_q=g[self.o_cu:self.o_cu + s + 1],
                            num_decodes=0, max_query_len=t, max_context_len=r.max_model_len,
                            q_blocks=g[self.o_qb:self.o_qb + self.nqb])
        hidden = r.model(ids, pos, meta)[0]                                  # [t, H]
        self.g_hidden[:t] = hidden
        logits = r.model.compute_logits(hidden[g[self.o_rows:self.o_rows + s].long()])   # [s, V]
        r.g_logits[:s] = logits

    # ------------------------------------------------------------------ replay
    def fill(self, batch: ScheduledBatch) -> tuple[int, list[int]]:
        """Pack ``batch`` into the host buffer; (bucket, indices of the sequences that sample)."""
        h, T, s, bs = self.h, self.T, self.s, self.r.block_size
        ids, pos, slots = h[:T], h[T:2 * T], h[2 * T:3 * T]
        cu, ctx = h[self.o_cu:self.o_cu + s + 1], h[self.o_ctx:self.o_ctx + s]
        rows, table = h[self.o_rows:self.o_rows + s], h[self.o_bt:self.o_bt + s * self.w].reshape(s, self.w)
        i, sampled = 0, []
        for j, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start, bt = seq.num_computed_tokens, seq.block_table
            if n == 1:
                ids[i], pos[i], slots[i] = seq.token_ids[start], start, bt[start // bs] * bs + start % bs
            else:
                p = np.arange(start, start + n)
                ids[i:i + n] = seq.token_ids[start:start + n]
                pos[i:i + n] = p
                slots[i:i + n] = np.asarray(bt)[p // bs] * bs + p % bs
            table[j, :len(bt)] = bt
            ctx[j] = start + n
            i += n
            cu[j + 1] = i
            if start + n == len(seq):                 # its known tokens all computed: it samples
                rows[len(sampled)] = i - 1
                sampled.append(j)
        m = len(batch.seqs)
        t = next(b for b in self.sizes if b >= i)
        ids[i:t], pos[i:t], slots[i:t] = 0, 0, self.r.scratch_slot
        cu[m + 1:], ctx[m:] = i, 0
        rows[len(sampled):] = 0
        self._fill_query_blocks(np.asarray(batch.num_new))
        return t, sampled

    def span(self, j: int) -> tuple[int, int]:
        """The token rows ``a, b`` of the filled batch's sequence ``j`` (in ``g_hidden`` after the replay)."""
        o = self.o_cu + j
        return int(self.h[o]), int(self.h[o + 1])

    def _fill_query_blocks(self, num_new: np.ndarray) -> None:
        """The prefill kernel's programs: sequence j's query blocks 0 .. ceil(n_j / M) - 1, then -1."""
        qb = self.h[self.o_qb:self.o_qb + self.nqb]
        blocks = -(-num_new // self.m)                                   # [m] query blocks per sequence
        n = int(blocks.sum())
        seq = np.repeat(np.arange(len(blocks)), blocks)
        first = np.repeat(np.cumsum(blocks) - blocks, blocks)            # each sequence's first program
        qb[:n] = (seq << 16) | (np.arange(n) - first)
        qb[n:] = -1

    def replay(self, t: int) -> None:
        self.g_in.copy_(self.h_in, non_blocking=True)
        self.graphs[t].replay()
        self.replays += 1
