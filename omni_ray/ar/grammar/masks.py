"""``GrammarMasks``: the token bitmasks of a step's constrained rows, filled on the host while the
device runs the step's forward, then applied to those rows' logits only.

The model runner calls ``apply(logits, matchers, rows)`` after it has queued the forward (the
logits are not computed yet): the host fills one int32 bitmask row [ceil(V/32)] per constrained
sequence (xgrammar's ``BatchGrammarMatcher``, in threads when there are several) into a pinned
buffer, copies them to the device behind the forward, and masks those rows (disallowed tokens ->
-inf) before temperature / top-k / top-p. Unconstrained rows are not touched, and a batch without
constrained rows never comes here. ``fill_s`` / ``steps`` / ``rows`` count the host's share.

Multi-step decode (``DecodeRun``): the k forwards of a run follow each other on the device, each
fed the token sampled after the previous one. For step j > 0 the host waits only for step j-1's
tokens (copied to a pinned buffer behind its sampling, before step j's forward was queued),
advances each constrained row's matcher by its token, and fills step j's masks while the device
runs forward j. The run's accepted tokens are rolled back at its end: the engine advances the
matchers itself when it applies the run's tokens (and drops what follows a finished row's end).
A row whose grammar ended inside the run is left unmasked for the rest of it (its tokens there are
dropped).
"""

from __future__ import annotations

import time

import torch
import xgrammar as xgr


def constrained_rows(seqs) -> list[int]:
    """Indices of ``seqs`` that sample under a grammar (their matcher is live)."""
    return [i for i, s in enumerate(seqs) if s.grammar is not None and s.grammar.matcher is not None]


class GrammarMasks:
    def __init__(self, vocab_size: int, max_rows: int, device: torch.device, fill_threads: int = 0):
        self.vocab_size, self.device = vocab_size, device
        width = xgr.get_bitmask_shape(1, vocab_size)[1]
        cuda = device.type == "cuda"
        self.host = torch.zeros(max_rows, width, dtype=torch.int32, pin_memory=cuda)
        self.dev = self.host if not cuda else torch.zeros(max_rows, width, dtype=torch.int32, device=device)
        self.h_idx = torch.zeros(max_rows, dtype=torch.long, pin_memory=cuda)     # the rows, for index_select
        self.h_tok = torch.zeros(max_rows, dtype=torch.long, pin_memory=cuda)     # a run's previous tokens
        self.tok_ready = torch.cuda.Event() if cuda else None
        self.batch = xgr.BatchGrammarMatcher(fill_threads or "auto")
        self.steps, self.rows, self.fill_s = 0, 0, 0.0

    def fill(self, matchers: list) -> torch.Tensor:
        """The bitmask rows of ``matchers`` (host, [m, W]); a None matcher's row allows every token."""
        t0 = time.perf_counter()
        host = self.host[:len(matchers)]
        live = [i for i, m in enumerate(matchers) if m is not None]
        if len(live) < len(matchers):
            host.fill_(-1)
        if len(live) == 1:
            matchers[live[0]].fill_next_token_bitmask(host, live[0])
        elif live:
            self.batch.batch_fill_next_token_bitmask([matchers[i] for i in live], host, indices=live)
        self.fill_s += time.perf_counter() - t0
        self.steps += 1
        self.rows += len(live)
        return host

    def apply(self, logits: torch.Tensor, matchers: list, rows: list[int]) -> None:
        """Mask ``logits`` [B, V] in place at ``rows`` by ``matchers`` (one per row)."""
        host = self.fill(matchers)
        m = len(rows)
        dev = self.dev[:m]
        if dev.data_ptr() != host.data_ptr():
            dev.copy_(host, non_blocking=True)
        vocab = min(self.vocab_size, logits.shape[-1])
        if m == logits.shape[0]:
            xgr.apply_token_bitmask_inplace(logits, dev, vocab_size=vocab)
            return
        h_idx = self.h_idx[:m]
        h_idx.copy_(torch.as_tensor(rows, dtype=torch.long))
        idx = h_idx.to(logits.device, non_blocking=True)
        sub = logits.index_select(0, idx)
        xgr.apply_token_bitmask_inplace(sub, dev, vocab_size=vocab)
        logits.index_copy_(0, idx, sub)


class DecodeRun:
    """The constrained rows of one multi-step decode run (see the module's docstring)."""

    def __init__(self, masks: GrammarMasks, seqs, rows: list[int]):
        self.masks, self.rows = masks, rows
        self.matchers = [seqs[i].grammar.matcher for i in rows]
        self.accepted = [0] * len(rows)          # tokens each matcher took inside this run (rolled back)
        self.live = [True] * len(rows)

    def mask(self, logits: torch.Tensor, step: int) -> None:
        """Step ``step``'s masks on ``logits`` [n, V] (after the step's forward was queued)."""
        if step > 0:
            self._advance()
        self.masks.apply(logits, [m if ok else None for m, ok in zip(self.matchers, self.live)], self.rows)

    def sampled(self, ids: torch.Tensor, last: bool) -> None:
        """The step's sampled tokens [n] (device): on their way to the host for the next step's masks."""
        if not last:
            self.masks.h_tok[:ids.shape[0]].copy_(ids, non_blocking=True)
            if self.masks.tok_ready is not None:
                self.masks.tok_ready.record()

    def _advance(self) -> None:
        if self.masks.tok_ready is not None:
            self.masks.tok_ready.synchronize()           # the previous step's sampling, not this forward
        toks = self.masks.h_tok.tolist()
        for j, (i, m) in enumerate(zip(self.rows, self.matchers)):
            if not self.live[j]:
                continue
            if not m.accept_token(toks[i]):
                self.live[j] = False
                continue
            self.accepted[j] += 1
            if m.is_terminated():
                self.live[j] = False

    def finish(self) -> None:
        """Roll every matcher back to where the run found it (the engine advances them as it applies)."""
        for m, n in zip(self.matchers, self.accepted):
            if n:
                m.rollback(n)
