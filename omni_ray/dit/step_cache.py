"""Step caching: per-request state and the per-sample skip decisions.

Both rules compare a cheap signal with the one from an earlier step, by relative L1
(``mean|cur - prev| / mean|prev|``, per request over its rows):

* fbcache (first-block cache, as ParaAttention's): the signal is block 0's residual. Under the
  threshold, the remaining blocks are skipped and their residual from the last full step is
  added instead. The reference signal only moves on full steps, so drift accumulates until a
  recompute.
* teacache: the signal is block 0's timestep-modulated input, compared step to step and
  accumulated (rescaled by the family's fitted polynomial, as the TeaCache paper does, where it has
  one). While the sum stays under the threshold, every block is skipped (the residual of
  all blocks from the last full step is added); a full step resets the sum.

The first and last denoising steps always run in full. One host sync per rule per step reads the
distances of all the batch's requests at once.
"""

from __future__ import annotations

import functools

import torch

from omni_ray.dit.params import StepCacheParams


class StepCacheState:
    __slots__ = ("method", "threshold", "prev", "residual", "accum", "coefficients")

    def __init__(self, params: StepCacheParams, coefficients: tuple | None = None):
        self.method = params.method
        self.threshold = params.threshold
        self.coefficients = coefficients            # teacache: the family's rescaling polynomial (None: identity)
        self.prev: torch.Tensor | None = None       # the signal to compare with
        self.residual: torch.Tensor | None = None   # [rows, N, D] the skipped blocks' residual
        self.accum = 0.0                            # teacache: accumulated change since the last full step

    def forced(self, step_idx: int, total: int) -> bool:
        return step_idx == 0 or step_idx >= total - 1 or self.residual is None or self.prev is None


def relative_l1(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """0-dim float32 tensor: mean |cur - prev| / mean |prev|."""
    cur, prev = cur.float(), prev.float()
    return (cur - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)


def _poly(coefficients: tuple, d: float) -> float:
    out = 0.0
    for c in coefficients:
        out = out * d + c
    return out


@functools.lru_cache(maxsize=16)
def _rising_until(coefficients: tuple) -> float:
    """Where the polynomial stops rising on [0, 1] after its first minimum (a fit is only meaningful up to
    there; one may dip first near 0, as TeaCache's Wan2.1 1.3B fit does)."""
    vals = [_poly(coefficients, i / 1000) for i in range(1001)]
    i = 0
    while i < 1000 and vals[i + 1] < vals[i]:       # the descent to the first minimum (none for most fits)
        i += 1
    while i < 1000 and vals[i + 1] >= vals[i]:      # the rise to the first peak
        i += 1
    return i / 1000


def rescale(d: float, coefficients: tuple | None) -> float:
    """TeaCache's rescaled distance: the family's polynomial (numpy order, highest power first) of the
    relative L1 of its signal (the modulated input; Wan: the time embedding), fitted to predict the relative
    L1 of the model's output, as published up to its first peak. Past it (a quartic fit turns down, even
    negative, for large distances) the larger of its peak and the raw distance counts, so a big change never
    reads as a small one."""
    if coefficients is None:
        return d
    top = _rising_until(coefficients)
    if d <= top:
        return _poly(coefficients, d)
    return max(_poly(coefficients, top), d)


def decide(states: list[StepCacheState], signals: list[torch.Tensor], forced: list[bool]) -> list[bool]:
    """Skip decisions (True = reuse) for requests of one method. Updates their state's reference
    signal and accumulator (residuals are stored by the caller after the full rows ran)."""
    dists = [relative_l1(sig, st.prev) for st, sig, f in zip(states, signals, forced) if not f]
    values = iter(torch.stack(dists).tolist() if dists else [])    # the one host sync
    skips = []
    for st, sig, f in zip(states, signals, forced):
        d = None if f else next(values)
        if st.method == "teacache":
            st.accum = 0.0 if f else st.accum + rescale(d, st.coefficients)
            skip = not f and st.accum < st.threshold
            if not skip:
                st.accum = 0.0
            st.prev = sig.clone()             # teacache compares consecutive steps
        else:
            skip = not f and d < st.threshold
            if not skip:
                st.prev = sig.clone()         # fbcache compares with the last full step
        skips.append(skip)
    return skips
