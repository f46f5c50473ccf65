"""Parallel inference for the DiT engine, chosen by ``DiTEngineConfig.parallel``:

* CFG parallel (``cfg_parallel: true``, 2 ranks): the doubled batch's rows are cut in two, so each
  CFG pair's unconditional and conditional halves run on different ranks; predictions are
  all-gathered and rank 0 applies the guidance and the scheduler step.
* Sequence parallel (``sequence_parallel_size: N``): each rank holds 1/N of the image tokens (Wan
  video: of the frame-height-width tokens, with their 3D RoPE rows); self-attention runs
  Ulysses-style (all-to-all over heads), the caption / text context stays whole on every rank.
* Both: ``2 * N`` ranks.

Rank 0 is the engine's process; the others are Ray actors of one placement group
(``omni_ray.cluster.worker_group.WorkerGroup``).
"""

from omni_ray.dit.parallel.layout import Layout, check_layout, make_layout
from omni_ray.dit.parallel.rank import DiTRank, RankFactory
from omni_ray.dit.parallel.runner import ParallelRunner, build_parallel_runner

__all__ = ["DiTRank", "Layout", "ParallelRunner", "RankFactory", "build_parallel_runner", "check_layout",
           "make_layout"]
