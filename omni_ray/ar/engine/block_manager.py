"""Paged KV-cache bookkeeping: ref-counted blocks with prefix caching.

A full block is identified by a hash of (the previous block's hash, its key: the token ids, and
for a multimodal prompt the content hashes of the media in it), so a block is shared only when
the whole prefix up to it is equal — the same placeholders for another image never match.
Freed blocks keep their hash and stay findable until they are reused; reuse takes the least
recently freed block first (LRU).
"""

from __future__ import annotations

from collections import OrderedDict

from omni_ray.ar.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")    # token_ids: the block's key (Sequence.block_key)

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hits = 0       # tokens served from the cache
        self.prefix_queries = 0    # prompt tokens looked up

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @staticmethod
    def chain_hash(prev: int | None, tokens: tuple) -> int:
        return hash((prev, tokens))

    def _lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest cached prefix, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], None
        for i in range(min(len(seq) - 1, seq.num_cacheable_tokens) // self.block_size):
            tokens = seq.block_key(i)
            h = self.chain_hash(prev, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
            prev = h
        return hits

    # ------------------------------------------------------------------ allocation
    def _take_free(self) -> Block:
        bid, _ = self.free.popitem(last=False)          # least recently freed
        block = self.blocks[bid]
        if block.hash is not None:                       # evict from the prefix cache
            if self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block

    def can_admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return need <= self.num_free_blocks  # conservative: ignores cache hits

    def admit(self, seq: Sequence) -> None:
        """First scheduling of a waiting sequence: take its cached prefix blocks, up to
        ``seq.num_cacheable_tokens``: encode (hidden-state) requests only within their dropped prefix,
        those asking for prompt log-probabilities none (the cache holds K/V, not hidden states or
        logits; vLLM does the same)."""
        assert not seq.block_table
        hits = self._lookup(seq)
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make the block table cover the next ``num_new_tokens`` tokens. False if out of blocks."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free().block_id)
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: hash the blocks whose tokens are now all in the cache."""
        if not self.enable_prefix_caching:
            return
        n_full = seq.num_computed_tokens // self.block_size
        prev = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, n_full):
            block = self.blocks[seq.block_table[i]]
            tokens = seq.block_key(i)
            h = self.chain_hash(prev, tokens)
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id
            prev = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, n_full)

    def free_seq(self, seq: Sequence) -> None:
        # free in reverse so a sequence's tail is evicted before its (more shareable) head
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
