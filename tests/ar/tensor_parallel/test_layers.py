"""Tensor-parallel layers without a process group: what each rank loads."""

from __future__ import annotations

import torch

from omni_ray.ar.layers.linear import QKVParallelLinear, RowParallelLinear
from omni_ray.ar.layers.parallel import TPContext


def test_row_parallel_bias_is_whole_on_every_rank():
    w, b = torch.randn(6, 8), torch.randn(6)
    for rank in range(2):
        layer = RowParallelLinear(8, 6, bias=True, tp=TPContext(rank, 2))
        layer.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        assert torch.equal(layer.weight, w[:, rank * 4:(rank + 1) * 4])
        assert torch.equal(layer.bias, b)          # added once, after the all-reduce


def test_qkv_kv_heads_replicated_when_fewer_than_ranks():
    d, hidden = 4, 16
    q, k, v = torch.randn(8 * d, hidden), torch.randn(2 * d, hidden), torch.randn(2 * d, hidden)
    for rank in range(4):                          # 8 q heads, 2 KV heads over 4 ranks
        layer = QKVParallelLinear(hidden, d, 8, 2, tp=TPContext(rank, 4))
        for name, src in (("q", q), ("k", k), ("v", v)):
            layer.weight_loader(layer.weight, src, name)
        kv = rank // 2                             # q heads 2r, 2r+1 use KV head (2r) // 4
        assert (layer.n_heads, layer.n_kv_heads) == (2, 1)
        assert torch.equal(layer.weight[:2 * d], q[rank * 2 * d:(rank + 1) * 2 * d])
        assert torch.equal(layer.weight[2 * d:3 * d], k[kv * d:(kv + 1) * d])
        assert torch.equal(layer.weight[3 * d:], v[kv * d:(kv + 1) * d])
