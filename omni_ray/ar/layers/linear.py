"""Linear layers that know their tensor-parallel slice and load only it from safetensors.

Each parameter carries ``weight_loader(param, source, shard_id=None)`` where ``source`` is a
safetensors slice (``safe_open(...).get_slice(name)``) or a tensor; the loader reads just this
rank's rows/columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni_ray.ar.layers.parallel import TP1, TPContext


def _read(source, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
    """Read [rows, cols] of a tensor or safetensors slice (only those bytes for a slice)."""
    r = slice(*rows) if rows else slice(None)
    if cols is None:
        return source[r] if rows else source[:]
    return source[r, slice(*cols)]


class Linear(nn.Module):
    """Replicated: every rank holds the whole weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPContext = TP1):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, source, shard_id=None) -> None:
        param.data.copy_(_read(source))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(Linear):
    """Output features split across ranks: y_rank = x @ W[rows_rank].T"""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPContext = TP1):
        assert out_features % tp.size == 0, f"{out_features} not divisible by tp={tp.size}"
        super().__init__(in_features, out_features // tp.size, bias, tp)

    def weight_loader(self, param, source, shard_id=None) -> None:
        n = param.shape[0]
        param.data.copy_(_read(source, (self.tp.rank * n, (self.tp.rank + 1) * n)))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked (gate_proj + up_proj -> gate_up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp: TPContext = TP1):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp)

    def weight_loader(self, param, source, shard_id: int = 0) -> None:
        per = [s // self.tp.size for s in self.out_sizes]
        off = sum(per[:shard_id])
        n = per[shard_id]
        param.data[off:off + n].copy_(_read(source, (self.tp.rank * n, (self.tp.rank + 1) * n)))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections stacked; KV heads are split, or replicated when fewer than ranks."""

    def __init__(self, hidden: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool = False,
                 tp: TPContext = TP1):
        assert n_heads % tp.size == 0, f"{n_heads} attention heads not divisible by tp={tp.size}"
        self.head_dim = head_dim
        self.n_heads = n_heads // tp.size
        if n_kv_heads >= tp.size:
            assert n_kv_heads % tp.size == 0, f"{n_kv_heads} KV heads not divisible by tp={tp.size}"
            self.n_kv_heads, self.kv_rank = n_kv_heads // tp.size, tp.rank
        else:  # replicate: ranks r share KV head r * n_kv / size
            assert tp.size % n_kv_heads == 0
            self.n_kv_heads, self.kv_rank = 1, tp.rank * n_kv_heads // tp.size
        out = (self.n_heads + 2 * self.n_kv_heads) * head_dim
        Linear.__init__(self, hidden, out, bias, tp)

    def weight_loader(self, param, source, shard_id: str = "q") -> None:
        d = self.head_dim
        q, kv = self.n_heads * d, self.n_kv_heads * d
        if shard_id == "q":
            dst, rows = param.data[:q], (self.tp.rank * q, (self.tp.rank + 1) * q)
        else:
            off = q if shard_id == "k" else q + kv
            dst, rows = param.data[off:off + kv], (self.kv_rank * kv, (self.kv_rank + 1) * kv)
        dst.copy_(_read(source, rows))


class RowParallelLinear(Linear):
    """Input features split across ranks; partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPContext = TP1):
        assert in_features % tp.size == 0
        super().__init__(in_features // tp.size, out_features, bias, tp)

    def weight_loader(self, param, source, shard_id=None) -> None:
        if param.dim() == 1:  # bias: whole on every rank, added after the all-reduce (``reduce``)
            param.data.copy_(_read(source))
            return
        n = param.shape[1]
        param.data.copy_(_read(source, None, (self.tp.rank * n, (self.tp.rank + 1) * n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(F.linear(x, self.weight))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial products, then add the bias once."""
        y = self.tp.all_reduce(partial)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, tp: TPContext = TP1):
        super().__init__()
        self.tp = tp
        self.vocab = vocab
        self.per = -(-vocab // tp.size)
        self.start = tp.rank * self.per
        self.weight = nn.Parameter(torch.empty(self.per, dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, source, shard_id=None) -> None:
        end = min(self.start + self.per, self.vocab)
        param.data.zero_()
        param.data[: end - self.start].copy_(_read(source, (self.start, end)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.per)
        y = F.embedding(local.clamp(0, self.per - 1), self.weight) * mask.unsqueeze(-1)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection; logits gathered on every rank, cut to the vocab."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        return self.tp.all_gather_last(logits)[..., : self.vocab]
