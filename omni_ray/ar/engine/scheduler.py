"""Continuous batching with a token budget, chunked prefill and preemption by recompute.

Every step mixes decodes (one token each) and prefill chunks under ``max_num_batched_tokens``:
running sequences are served first (oldest first), then waiting ones are admitted while the
budget, ``max_num_seqs`` and free blocks allow. When a running sequence needs a block and none is
free, the newest running sequence is preempted (its blocks freed, recomputed later).

Multimodal prompts: a chunk that reaches media whose encoder output is not cached spends the
step's encoder budget (``max_num_encoder_tokens``) on it; past the budget the chunk stops right
before that item (chunked prefill may still split a prompt inside an item already encoded). An item
that came with its embedding (an encoder stage ran the tower) costs nothing.

A sequence fed streamed input embeddings (``omni_ray/ar/input_embeds.py``) whose next decode row
has not arrived sits out the step, keeping its blocks.
"""

from __future__ import annotations

from collections import deque

from omni_ray.ar.batch import ScheduledBatch
from omni_ray.ar.engine.block_manager import BlockManager
from omni_ray.ar.sequence import SeqStatus, Sequence
from omni_ray.config import ARSchedulerConfig


class Scheduler:
    def __init__(self, cfg: ARSchedulerConfig, block_manager: BlockManager, lookahead: int = 0,
                 encoder_cache=None):
        self.cfg = cfg
        self.encoder_cache = encoder_cache      # multimodal models: what is encoded already (hash in cache)
        self._enc_left, self._enc_seen = 0, set()
        self.bm = block_manager
        self.lookahead = lookahead      # decode slots allocated ahead when blocks are plentiful (async decode runs)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.watermark = max(1, block_manager.num_blocks // 100)

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for q in (self.running, self.waiting):
            for seq in list(q):
                if seq.request_id == request_id:
                    q.remove(seq)
                    self.finish(seq, "abort", remove=False)
                    return seq
        return None

    def finish(self, seq: Sequence, reason: str, remove: bool = True) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.bm.free_seq(seq)
        if remove and seq in self.running:
            self.running.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ step
    def _chunk(self, seq: Sequence, budget: int) -> int:
        if seq.waits_for_input:                 # streamed input embeddings: its next row is not here yet
            return 0
        remaining = len(seq) - seq.num_computed_tokens
        n = remaining if remaining <= budget else budget if self.cfg.enable_chunked_prefill else 0
        if seq.mm is None or n <= 1 or not self.cfg.enable_chunked_prefill:     # unchunked: all its media at once
            return n
        return self._fit_media(seq, n)

    def _fit_media(self, seq: Sequence, n: int) -> int:
        """``n`` cut before the first media item of the chunk that the step's encoder budget cannot
        take (an item over the whole budget goes alone, in a step that encodes nothing else)."""
        start = seq.num_computed_tokens
        for it in seq.mm.items:
            if it.end <= start or it.offset >= start + n or it.hash in self._enc_seen:
                continue
            if it.embedding is not None or (self.encoder_cache is not None and it.hash in self.encoder_cache):
                continue                        # computed already (an encoder stage's output, or cached)
            fresh = self._enc_left == self.cfg.max_num_encoder_tokens
            if it.length > self._enc_left and not fresh:
                return max(0, it.offset - start)
            self._enc_left = max(0, self._enc_left - it.length)
            self._enc_seen.add(it.hash)
        return n

    def _allocate_ahead(self, seq: Sequence) -> None:
        """Blocks for the decode slots after this step's, while the watermark stays free: a run
        queued on top of this one (``async_decode``) needs them in the block table already."""
        ahead = min(1 + self.lookahead, self.cfg.max_model_len - seq.num_computed_tokens)  # never past max_model_len
        extra = self.bm.blocks_needed(seq, ahead)
        if extra and extra + self.watermark <= self.bm.num_free_blocks:
            self.bm.allocate(seq, ahead)

    def schedule(self) -> ScheduledBatch:
        budget = self.cfg.max_num_batched_tokens
        self._enc_left, self._enc_seen = self.cfg.max_num_encoder_tokens, set()
        picked: list[tuple[Sequence, int]] = []
        # 1) running sequences, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n == 0:
                i += 1
                continue
            while not self.bm.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                if n == 1 and self.lookahead:
                    self._allocate_ahead(seq)
                picked.append((seq, n))
                budget -= n
                i += 1
        # 2) admit waiting sequences
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            self.bm.admit(seq)
            n = self._chunk(seq, budget)
            need = self.bm.blocks_needed(seq, n)
            if n == 0 or need + self.watermark > self.bm.num_free_blocks and self.running:
                self.bm.free_seq(seq)
                seq.reset_for_recompute()
                break
            if not self.bm.allocate(seq, n):
                self.bm.free_seq(seq)
                seq.reset_for_recompute()
                break
            self.waiting.popleft()
            self.bm.prefix_hits += seq.num_cached_tokens
            self.bm.prefix_queries += len(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            picked.append((seq, n))
            budget -= n
        decodes = [(s, n) for s, n in picked if n == 1]
        prefills = [(s, n) for s, n in picked if n != 1]
        ordered = decodes + prefills
        return ScheduledBatch([s for s, _ in ordered], [n for _, n in ordered], len(decodes))
