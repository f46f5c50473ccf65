"""Batched sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Log-probabilities are those of the raw model distribution (before temperature and filters, as
vLLM's default): ``token_logprobs`` gives, for each row, the chosen token's and the batch's
largest asked number of top alternatives, only when some row asked.

Random rows use the exponential-race form of categorical sampling
(argmax(p / E), E ~ Exp(1)); a seeded request draws its E from its own generator, so its
tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ray.devices import to_device


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
    num_logprobs: int = -1        # top alternatives to return per row: the batch's most asked (-1: none)

    @property
    def want_logprobs(self) -> bool:
        return self.num_logprobs >= 0


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


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V], chosen ids [B] -> (ids [B, 1 + k], logprobs [B, 1 + k]): column 0 the chosen
    token, columns 1..k the k most likely tokens in rank order (log_softmax of the raw logits)."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(-1, ids[:, None].long())
    if k == 0:
        return ids[:, None].long(), chosen
    top_lp, top_ids = lp.topk(k, dim=-1)
    return torch.cat([ids[:, None].long(), top_ids], 1), torch.cat([chosen, top_lp], 1)


def apply_repetition_penalty(logits: torch.Tensor, rows: list[int], token_ids: list[list[int]],
                             penalties: list[float]) -> None:
    """In place, transformers' / vLLM's repetition penalty: for each row in ``rows``, the logits of the
    tokens in its ``token_ids`` (prompt and output so far) divided by its penalty where positive,
    multiplied where negative."""
    width = max(len(ids) for ids in token_ids)
    ids = to_device([list(t) + [t[-1]] * (width - len(t)) for t in token_ids], logits.device)
    r = to_device(rows, logits.device)
    p = to_device(penalties, logits.device, logits.dtype)[:, None]
    score = logits[r].gather(1, ids)
    score = torch.where(score < 0, score * p, score / p)
    logits[r] = logits[r].scatter(1, ids, score)


def penalize_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    """In place, the same penalty on the device: ``seen`` [B, V] bool marks each row's tokens so far,
    ``penalty`` [B, 1] (in the logits' dtype; 1 leaves a row as it is)."""
    scaled = torch.where(logits < 0, logits * penalty, logits / penalty)
    logits.copy_(torch.where(seen, scaled, logits))


def sample(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """logits [B, V] -> (token ids [B], ``token_logprobs`` (ids, logprobs) [B, 1 + k] or None)."""
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
        logprobs = token_logprobs(logits, ids, t.num_logprobs)
    return ids, logprobs
