"""``GrammarMasks``: the token bitmasks of a step's constrained rows, filled on the host while the
device runs the step's forward, then applied to those rows' logits only.

The model runner calls ``apply(logits, seqs, rows)`` after it has queued the forward (the logits
are not computed yet): the host fills one int32 bitmask row [ceil(V/32)] per constrained sequence
(xgrammar's ``BatchGrammarMatcher``, in threads when there are several) into a pinned buffer, copies
them to the device behind the forward, and masks those rows (disallowed tokens -> -inf) before
temperature / top-k / top-p. Unconstrained rows are not touched, and a batch without constrained
rows never comes here. ``fill_s`` / ``steps`` / ``rows`` count the host's share (benchmarks).
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
        self.batch = xgr.BatchGrammarMatcher(fill_threads or "auto")
        self.steps, self.rows, self.fill_s = 0, 0, 0.0

    def fill(self, matchers: list) -> torch.Tensor:
        """The bitmask rows of ``matchers`` (host, [m, W])."""
        t0 = time.perf_counter()
        host = self.host[:len(matchers)]
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(host)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, host)
        self.fill_s += time.perf_counter() - t0
        self.steps += 1
        self.rows += len(matchers)
        return host

    def apply(self, logits: torch.Tensor, seqs, rows: list[int]) -> None:
        """Mask ``logits`` [B, V] in place at ``rows`` by the grammars of ``seqs[rows]``."""
        host = self.fill([seqs[i].grammar.matcher for i in rows])
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
