"""Who computes what in a parallel DiT forward: ranks, rows (CFG halves) and tokens (sequence shards).

``world = cfg * sp`` ranks; rank ``c * sp + s`` runs row group ``c`` (CFG parallel: the doubled
batch's rows cut in two, so a lone CFG request has its unconditional half on one group and its
conditional half on the other) and token shard ``s`` of those rows (Ulysses sequence parallel).
Rank 0 is the engine's own process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_ray.config import DiTEngineConfig
from omni_ray.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    cfg: int                  # row groups: 2 with cfg_parallel, else 1
    sp: int                   # sequence-parallel ranks per row group

    @property
    def world(self) -> int:
        return self.cfg * self.sp

    def cfg_index(self, rank: int) -> int:
        return rank // self.sp

    def sp_index(self, rank: int) -> int:
        return rank % self.sp

    def sp_ranks(self, c: int) -> list[int]:
        return [c * self.sp + s for s in range(self.sp)]

    def row_index(self, rows: int, c: int, device) -> torch.Tensor:
        """Row group ``c``'s rows of a ``rows``-row batch; the batch is padded up to a multiple of
        ``cfg`` by repeating its last row (computed, then dropped)."""
        per = -(-rows // self.cfg)
        return torch.arange(c * per, (c + 1) * per, device=device).clamp_(max=rows - 1)

    def token_counts(self, tokens: int) -> list[int]:
        """Tokens per sequence shard (sizes differ by at most one, larger shards first)."""
        base, extra = divmod(tokens, self.sp)
        return [base + (1 if s < extra else 0) for s in range(self.sp)]


def make_layout(cfg: DiTEngineConfig) -> Layout | None:
    """The layout the config asks for, or None for a single-process engine."""
    par = cfg.parallel
    if not par.cfg_parallel and par.sequence_parallel_size == 1:
        return None
    return Layout(cfg=2 if par.cfg_parallel else 1, sp=par.sequence_parallel_size)


def check_layout(layout: Layout, path: Path, cfg: DiTEngineConfig) -> None:
    """Raise ConfigError for a layout this model / config cannot run (read from the model's
    config, before any rank loads it)."""
    if layout.sp == 1:
        return
    tcfg = path / "transformer" / "config.json"
    heads = json.loads(tcfg.read_text()).get("num_attention_heads") if tcfg.exists() else None
    if not heads:
        raise ConfigError(f"{tcfg}: cannot read num_attention_heads for sequence parallel")
    if heads % layout.sp:
        raise ConfigError(f"parallel.sequence_parallel_size={layout.sp} must divide the transformer's "
                          f"{heads} attention heads (Ulysses splits the heads across ranks)")
    if cfg.compile:
        raise ConfigError("compile: true cannot be combined with parallel.sequence_parallel_size > 1 "
                          "(the blocks hold all-to-all collectives); turn one of them off")


def check_blocks(family, layout: Layout) -> None:
    """Sequence parallel hooks the families' lean blocks (PixArt's fast path, Wan's ``WanBlock``):
    every block must be one."""
    if layout.sp == 1:
        return
    name = type(family).__name__
    if name == "PixArtFamily" and not all(getattr(f, "fast", False) for f in family.block_fns):
        raise ConfigError("sequence parallel needs PixArt blocks of the plain ada_norm_single layout; "
                          "this transformer's blocks are not supported")
    if name in ("WanFamily", "WanI2VFamily", "WanTI2VFamily"):
        from omni_ray.dit.families.wan_block import WanBlock
        if not all(isinstance(f, WanBlock) for fns in family.expert_fns for f in fns):
            raise ConfigError("sequence parallel needs Wan blocks with RMS q/k norms across heads and a tanh-GELU "
                              "feed-forward (every Wan2.1 / Wan2.2 checkpoint); this transformer's blocks differ")
