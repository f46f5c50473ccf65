"""The repetition penalty of decode runs on the device: which tokens each row's sequence holds.

transformers' / vLLM's repetition penalty scales the logits of every token in the sequence so far
(prompt and output). In a decode run (several forwards back to back, CUDA-graph replays, no host
sync between them) the host cannot hand each step's token list over, so the device keeps a
``[rows, vocab]`` bool mask: loaded from the sequences when a run starts (the distinct tokens of
each, kept per sequence on the host and extended with the tokens added since), then each sampled
token is marked on the device right after it is drawn. A resumed run (the same batch, queued behind
the one in flight) keeps the mask as the device left it.

Only batches with a penalized row allocate the mask (on first use) and pay for it; the graphs do not
change: the penalty applies to the graph's logits in the sampled path, before the sampler.
"""

from __future__ import annotations

import numpy as np
import torch

from omni_ray.ar.layers.sampler import penalize_seen
from omni_ray.ar.sequence import Sequence


def has_penalty(seq: Sequence) -> bool:
    return getattr(seq.params, "repetition_penalty", 1.0) != 1.0


class SeenTokens:
    def __init__(self, max_rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.vocab, self.dtype, self.device = vocab, dtype, device
        self.mask = torch.zeros(max_rows, vocab, dtype=torch.bool, device=device)
        self.penalty = torch.ones(max_rows, 1, dtype=dtype, device=device)
        self._host: dict[int, tuple[np.ndarray, int]] = {}      # seq_id -> (distinct tokens [vocab] bool, tokens read)

    def distinct(self, seq: Sequence) -> np.ndarray:
        """The distinct tokens of ``seq`` (sorted), from its cached set extended by the tokens added since."""
        seen, read = self._host.get(seq.seq_id, (None, 0))
        if seen is None:
            seen = np.zeros(self.vocab, dtype=bool)
        if read < len(seq.token_ids):
            seen[np.asarray(seq.token_ids[read:], dtype=np.int64)] = True
        self._host[seq.seq_id] = (seen, len(seq.token_ids))
        return np.flatnonzero(seen)

    def load(self, seqs: list[Sequence]) -> None:
        """Rows [:len(seqs)]: each sequence's tokens so far and its penalty (1: none)."""
        n = len(seqs)
        self._host = {s.seq_id: self._host[s.seq_id] for s in seqs if s.seq_id in self._host}   # drop the gone
        toks = [self.distinct(s) if has_penalty(s) else np.zeros(0, dtype=np.int64) for s in seqs]
        rows = np.repeat(np.arange(n), [len(t) for t in toks])
        cols = np.concatenate(toks) if toks else np.zeros(0, dtype=np.int64)
        dev = self.device
        self.mask[:n].zero_()
        self.mask[:n][torch.from_numpy(rows).to(dev, non_blocking=True),
                      torch.from_numpy(cols).to(dev, non_blocking=True)] = True
        pen = torch.tensor([[getattr(s.params, "repetition_penalty", 1.0)] for s in seqs], dtype=self.dtype)
        self.penalty[:n].copy_(pen, non_blocking=True)

    def apply(self, logits: torch.Tensor) -> None:
        """In place: the penalty on the logits [n, V] of the first n rows."""
        n = logits.shape[0]
        penalize_seen(logits, self.mask[:n], self.penalty[:n])

    def mark(self, ids: torch.Tensor) -> None:
        """The tokens ``ids`` [n] just drawn for the first n rows join their sequences."""
        self.mask[:ids.shape[0]].scatter_(1, ids.view(-1, 1).long(), True)
