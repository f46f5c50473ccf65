"""Unit tests of the block manager, the sampler and the attention backends (CPU)."""

import torch

from omni_ray.ar.engine.block_manager import BlockManager
from omni_ray.ar.layers.sampler import SamplingTensors, sample
from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.ar.sequence import Sequence


def _seq(tokens, bs=4):
    return Sequence(tokens, SamplingParams(), block_size=bs)


def test_prefix_blocks_are_shared_refcounted_and_evicted_lru():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = _seq(list(range(10)))                 # 2 full blocks + 2 tokens
    bm.admit(a)
    assert bm.allocate(a, 10) and len(a.block_table) == 3
    a.num_computed_tokens = 10
    bm.register_full_blocks(a)
    b = _seq(list(range(8)) + [99, 98, 97])   # shares the 2 full blocks
    bm.admit(b)
    assert b.num_cached_tokens == 8 and b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.allocate(b, 3)
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free_blocks == 6
    # cached blocks stay findable after being freed ...
    c = _seq(list(range(9)))
    bm.admit(c)
    assert c.num_cached_tokens == 8
    bm.free_seq(c)
    # ... until the LRU reuse takes them
    d = _seq([7] * 24)
    bm.admit(d)
    assert bm.allocate(d, 24)
    e = _seq(list(range(9)))
    bm.admit(e)
    assert e.num_cached_tokens == 0


def test_full_prompt_hit_still_computes_last_token():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _seq(list(range(8)))
    bm.admit(a)
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.register_full_blocks(a)
    b = _seq(list(range(8)))
    bm.admit(b)
    assert b.num_cached_tokens == 4        # the last block is recomputed so logits exist


def _tensors(n, **kw):
    p = dict(temperature=torch.ones(n), top_k=torch.zeros(n, dtype=torch.long), top_p=torch.ones(n),
             min_p=torch.zeros(n), generators=[None] * n, need_topk_topp=False, need_min_p=False,
             all_greedy=False)
    p.update(kw)
    return SamplingTensors(**p)


def test_top_k_top_p_min_p_restrict_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 50).repeat(400, 1)
    order = logits[0].argsort(descending=True)
    ids, _ = sample(logits, _tensors(400, top_k=torch.full((400,), 3), need_topk_topp=True))
    assert set(ids.tolist()) <= set(order[:3].tolist()) and len(set(ids.tolist())) == 3
    probs = logits[0].softmax(-1)[order]
    keep = int((probs.cumsum(0) - probs < 0.5).sum())
    ids, _ = sample(logits, _tensors(400, top_p=torch.full((400,), 0.5), need_topk_topp=True))
    assert set(ids.tolist()) <= set(order[:keep].tolist())
    ids, _ = sample(logits, _tensors(400, min_p=torch.full((400,), 0.5), need_min_p=True))
    allowed = (logits[0].softmax(-1) >= 0.5 * logits[0].softmax(-1).max()).nonzero().flatten()
    assert set(ids.tolist()) <= set(allowed.tolist())


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    ids, (lp_ids, lp) = sample(logits, _tensors(20000, num_logprobs=2))
    freq = torch.bincount(ids, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02, rtol=0)
    assert lp_ids.shape == (20000, 3) and (lp_ids[:, 0] == ids).all()
    torch.testing.assert_close(lp[:, 0].exp(), torch.tensor([0.7, 0.2, 0.1])[ids], atol=1e-5, rtol=0)
    # columns 1..2: the two most likely tokens in rank order, whatever was drawn
    assert (lp_ids[:, 1:] == torch.tensor([0, 1])).all()
    torch.testing.assert_close(lp[:, 1:].exp(), torch.tensor([[0.7, 0.2]]).expand(20000, 2), atol=1e-5, rtol=0)
