"""The engine's runner when the transformer is spread over ranks (CFG parallel and/or Ulysses).

Everything but the transformer forward stays as in ``DiTRunner`` on rank 0 (inputs, schedulers,
the guided update); each step's forward is one ``WorkerGroup.post`` of a few ints (the step's
shapes; no pickling, no Ray call) after which every rank runs ``DiTRank.forward`` in lockstep
(``rank.py``). Per-request step caching is refused (its skip decisions and residuals would have to
live on every rank). A failure inside a step leaves the ranks out of step: the group is marked
failed, and this and every later step, new request and health check raise ``EngineError``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from omni_ray.config import DiTEngineConfig
from omni_ray.dit.parallel.layout import Layout, check_layout
from omni_ray.dit.parallel.rank import RankFactory, encode_meta, spec
from omni_ray.dit.request import DiTRequest
from omni_ray.dit.runner import DiTRunner
from omni_ray.errors import InvalidRequestError

log = logging.getLogger(__name__)


class ParallelRunner(DiTRunner):
    def __init__(self, workers, layout: Layout):
        self.workers, self.layout = workers, layout
        self.rank0 = workers.rank0
        super().__init__(self.rank0.family, None)
        self._sent_ctx = None                  # the caption rows the ranks hold (re-sent on change)

    # ------------------------------------------------------------------ health
    def check_health(self) -> None:
        """Raise EngineError if a step failed or a worker rank died."""
        self.workers.check_health()

    def check_request(self, req: DiTRequest) -> None:
        if req.cache is not None:
            raise InvalidRequestError("step caching (cache) is not supported by this engine: it runs the "
                                      "transformer in parallel (cfg_parallel / sequence_parallel_size)",
                                      param="cache")
        self.check_health()

    def describe(self) -> dict:
        return {"cfg_parallel": self.layout.cfg == 2, "sequence_parallel_size": self.layout.sp,
                "ranks": self.layout.world, "backend": self.workers.backend,
                "worker_pids": list(self.workers.worker_pids), "healthy": not self.workers.failed}

    def shutdown(self) -> None:
        self.workers.shutdown()

    # ------------------------------------------------------------------ one step
    def _transformer(self, reqs, x, t, ctx, bias, pooled) -> torch.Tensor:
        if any(r.cache is not None for r in reqs):         # make_request refuses these already
            raise InvalidRequestError("step caching is not supported with parallel DiT", param="cache")
        new_cond = ctx is not self._sent_ctx
        meta = {"x": spec(x), "t": spec(t),
                "cond": {"ctx": spec(ctx), "bias": spec(bias), "pooled": spec(pooled)} if new_cond else None,
                "shapes": self._shapes}
        values = encode_meta(meta)
        wg = self.workers
        with wg.lock:                          # the header and the step's collectives stay together
            try:
                self.rank0.stage(x=x, t=t, ctx=ctx, bias=bias, pooled=pooled)
                wg.post(values)
                pred = self.rank0.handle_post(np.asarray(values, dtype=np.int64))
            except BaseException as err:       # the ranks are out of step now: the group is done
                self._sent_ctx = None
                raise wg.failure(err) from err
        if wg.failed:                          # aborted under us (NCCL): the prediction is not to be trusted
            wg.check_health()
        self._sent_ctx = ctx
        n_blocks, s = len(self.family.blocks), self.stats
        s.block_evals_full += n_blocks * x.shape[0]
        s.block_evals += n_blocks * x.shape[0]
        for r in reqs:
            r.block_evals += n_blocks
        return pred


def build_parallel_runner(cfg: DiTEngineConfig, path: Path, dtype: torch.dtype, layout: Layout) -> ParallelRunner:
    """Start the ranks (rank 0 = this process, loading the whole model; the rest Ray actors) and
    return the runner that drives them. ConfigError for layouts the model cannot run; EngineError
    / ResourceError when the workers cannot start."""
    import ray

    from omni_ray.cluster.worker_group import WorkerGroup

    check_layout(layout, path, cfg)
    par = cfg.parallel
    pg = ray.util.get_current_placement_group() if ray.is_initialized() else None   # a Serve replica's bundles
    workers = WorkerGroup(layout.world, RankFactory(cfg, path, dtype, layout), device=cfg.device,
                          backend=par.backend, strategy=par.placement_strategy, placement_group=pg,
                          timeout_s=par.timeout_s, name="dit-parallel")
    log.info("parallel DiT: %d ranks (cfg %d x sequence %d) on %s", layout.world, layout.cfg, layout.sp,
             workers.device)
    return ParallelRunner(workers, layout)
