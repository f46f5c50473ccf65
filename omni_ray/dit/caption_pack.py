"""Caption packing: the caption stream's token-wise GEMMs over the batch's real caption tokens only.

An MMDiT batch pads every row's caption to the longest one (and CUDA graphs pad that to a bucket): with true
CFG at 8 concurrent Qwen-Image requests, 16 rows of 128 caption positions carry ~800 prompt tokens and ~100
negative-prompt tokens, so more than half of the text stream's projections and MLP rows are padding. The
attention and the elementwise work keep the padded ``[rows, T, D]`` layout (the padded keys stay masked);
only the GEMMs gather the rows a pack lists, and their outputs are scattered back, zeros elsewhere.

A pack is a LongTensor of flat positions into ``[rows * T]``: every real caption token, then, up to a bucket
of ``PACK_MULTIPLE``, padded positions (never a position twice, so the scatter is exact). A batch whose pack
would not drop at least ``MIN_SAVING`` of the rows is not packed (the gather and scatter would cost more).
"""

from __future__ import annotations

import functools

import torch

PACK_MULTIPLE = 128               # packed rows are a multiple of this (CUDA graphs: one graph per bucket)
MIN_SAVING = 0.25                 # pack only when it drops at least this share of the caption rows


def pack_positions(lens: tuple[int, ...] | list[int], T: int, rows: int | None = None,
                   multiple: int = PACK_MULTIPLE) -> list[int] | None:
    """The flat positions a pack lists for captions of ``lens`` real tokens padded to ``T`` (``rows`` >= len(lens):
    the padded batch's rows, whose positions can fill the bucket), or None where packing does not pay."""
    rows = len(lens) if rows is None else rows
    total = rows * T
    real = [i * T + j for i, n in enumerate(lens) for j in range(min(n, T))]
    size = min(-(-len(real) // multiple) * multiple, total)
    if size > (1 - MIN_SAVING) * total:
        return None
    taken = set(real)
    fill = (p for p in range(total) if p not in taken)
    return real + [next(fill) for _ in range(size - len(real))]


@functools.lru_cache(maxsize=256)
def cached_positions(lens: tuple[int, ...], T: int, rows: int, multiple: int) -> list[int] | None:
    """``pack_positions`` once per batch geometry (engine steps repeat it until requests come or go; never
    mutate the list it returns)."""
    return pack_positions(lens, T, rows, multiple)


def packed(fn, h: torch.Tensor, pack: torch.Tensor | None) -> torch.Tensor:
    """``fn`` (token-wise: [M, Din] -> [M, Dout]) on the pack's rows of ``h`` [B, T, Din] -> [B, T, Dout], zeros at
    the positions the pack leaves out; ``fn(h)`` when ``pack`` is None."""
    if pack is None:
        return fn(h)
    B, T = h.shape[:2]
    y = fn(h.reshape(B * T, -1).index_select(0, pack))              # [P, Dout]
    out = y.new_zeros(B * T, y.shape[-1])
    return out.index_copy_(0, pack, y).view(B, T, -1)
