"""Batched sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Random rows use the exponential-race form of categorical sampling
(argmax(p / E), E ~ Exp(1)); a seeded request draws its E from its own generator, so its
tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    temperature: torch.Tensor     # [B] float (0 = greedy)
    top_k: torch.Tensor           # [B] int (0 = off)
    top_p: torch.Tensor           # [B] float
    min_p: torch.Tensor           # [B] float
    generators: list              # [B] torch.Generator | None
    need_topk_topp: bool
    need_min_p: bool
    all_greedy: bool
    want_logprobs: bool


def _filter(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Mask logits outside top-k / top-p (nucleus) per row. logits [B, V] float32."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    v = logits.shape[-1]
    ranks = torch.arange(v, device=logits.device)[None, :]
    k = torch.where(t.top_k > 0, t.top_k, v)[:, None]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    cum = probs.cumsum(-1) - probs                     # mass strictly before each token
    drop |= cum > t.top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def sample(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] -> (token ids [B], logprobs of those tokens [B] or None)."""
    logits = logits.float()
    greedy_ids = logits.argmax(-1)
    logprobs = None
    if t.all_greedy:
        ids = greedy_ids
    else:
        temp = torch.where(t.temperature > 0, t.temperature, 1.0)[:, None]
        scaled = logits / temp
        if t.need_topk_topp:
            scaled = _filter(scaled, t)
        probs = scaled.softmax(-1)
        if t.need_min_p:
            probs = probs.masked_fill(probs < t.min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
        noise = torch.empty_like(probs).exponential_()
        for i, g in enumerate(t.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        ids = torch.where(t.temperature > 0, (probs / noise).argmax(-1), greedy_ids)
    if t.want_logprobs:
        logprobs = logits.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    return ids, logprobs
