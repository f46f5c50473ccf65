"""One denoising step for a batch of requests: stack their rows, run the transformer's pieces once
(skipping blocks per request where its step cache says so), then step each request's own
scheduler on its slice of the prediction.

Row layout: request after request; a request with classifier-free guidance has ``2n`` rows
(n unconditional, then n conditional, as the diffusers pipelines order them), else ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from omni_ray.dit.cuda_graphs import GraphedBlocks
from omni_ray.dit.families.base import BlockState, DiTFamily
from omni_ray.dit.request import DiTRequest
from omni_ray.dit.step_cache import StepCacheState, decide


@dataclass
class RunnerStats:
    forwards: int = 0              # transformer forwards (batched steps)
    rows: int = 0                  # transformer rows over all forwards
    images: int = 0                # images stepped over all forwards (rows before CFG doubling)
    last_batch_images: int = 0
    last_batch_rows: int = 0
    last_batch_requests: int = 0
    max_batch_images: int = 0
    block_evals: int = 0           # row x block evaluations actually run
    block_evals_full: int = 0      # ... and what they would have been without step caching
    cache_skips: int = 0           # (request, step) pairs that skipped blocks


def _spans(reqs: list[DiTRequest]) -> list[tuple[int, int]]:
    out, off = [], 0
    for r in reqs:
        out.append((off, off + r.num_rows))
        off += r.num_rows
    return out


class DiTRunner:
    def __init__(self, family: DiTFamily, graphs: GraphedBlocks | None = None):
        self.family = family
        self.graphs = graphs
        self.device = family.device
        self.stats = RunnerStats()
        self._cond_key: tuple | None = None
        self._cond: tuple | None = None
        self._shapes: tuple = ()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self, reqs: list[DiTRequest]) -> None:
        ode = getattr(self.graphs, "ode", None)       # speech families: whole ODEs (omni_ray/dit/token2wav_ode.py)
        if ode is not None:
            groups, reqs = ode.partition(reqs)
            for group in groups:
                self._whole_ode(ode, group)
            if not reqs:
                return
        x, t, ctx, bias, pooled = self._inputs(reqs)
        pred = self._transformer(reqs, x, t, ctx, bias, pooled)
        self._scheduler_steps(reqs, pred)
        s, rows = self.stats, x.shape[0]
        images = sum(r.num_images for r in reqs)
        s.forwards += 1
        s.rows += rows
        s.images += images
        s.last_batch_images, s.last_batch_rows, s.last_batch_requests = images, rows, len(reqs)
        s.max_batch_images = max(s.max_batch_images, images)

    def _whole_ode(self, ode, reqs: list[DiTRequest]) -> None:
        """Requests at their first evaluation run to their end at once; counted as the forwards they replace."""
        evals = ode.run(reqs)
        s, n_blocks = self.stats, len(self.family.blocks)
        rows, images = sum(r.num_rows for r in reqs), sum(r.num_images for r in reqs)
        for r in reqs:
            r.block_evals += n_blocks * evals
        s.forwards += evals
        s.rows += rows * evals
        s.images += images * evals
        s.block_evals += n_blocks * rows * evals
        s.block_evals_full += n_blocks * rows * evals
        s.last_batch_images, s.last_batch_rows, s.last_batch_requests = images, rows, len(reqs)
        s.max_batch_images = max(s.max_batch_images, images)

    def _inputs(self, reqs: list[DiTRequest]):
        xs, ts, conds = [], [], []
        fam = self.family
        for r in reqs:
            lat = r.latents
            t = r.timesteps[r.step_idx]
            if hasattr(r.scheduler, "scale_model_input"):
                lat = r.scheduler.scale_model_input(lat, t)
            lat = fam.model_input(r, lat)             # an input image's latents joined (edit, Wan I2V / TI2V)
            lat = torch.cat([lat, lat]) if r.do_cfg else lat
            xs.append(lat)
            ts += [fam.row_timestep(r, t)] * lat.shape[0]
            conds += ([r.neg_cond] * r.num_images if r.do_cfg else []) + [r.cond] * r.num_images
        if any(isinstance(v, tuple) for v in ts):   # per-token timesteps in some rows: [B, S] for all
            n = max(len(v) for v in ts if isinstance(v, tuple))
            ts = [v if isinstance(v, tuple) else (v,) * n for v in ts]
        key = tuple(r.arrival for r in reqs)      # arrival numbers are unique per engine (ids get reused)
        if key != self._cond_key:                   # membership changed: restack the captions
            self._cond_key, self._cond = key, self.family.batch_cond(conds)
        pin = self.device.type == "cuda"             # a pinned source: the copy never waits for the GPU
        t = torch.tensor(ts, dtype=torch.float32, pin_memory=pin).to(self.device, non_blocking=True)
        self._shapes = reqs[0].shapes                 # equal within a batch (part of the batching key)
        return (self.family.stack_latents(xs), t, *self._cond)

    def _scheduler_steps(self, reqs: list[DiTRequest], pred: torch.Tensor) -> None:
        fam = self.family
        for r, (a, b) in zip(reqs, _spans(reqs)):
            out = pred[a:b]
            if r.do_cfg:
                uncond, cond = out.chunk(2)
                out = fam.combine_cfg(uncond, cond, r.guidance_scale)
            out = fam.model_output(fam.request_output(out, r.latents))
            t = r.timesteps[r.step_idx]
            r.latents = r.scheduler.step(out, t, r.latents, **fam.step_kwargs(r.generator), return_dict=False)[0]
            r.step_idx += 1
            if r.is_done:
                r.latents = fam.final_latents(r)

    # ------------------------------------------------------------------ transformer with step caching
    def _transformer(self, reqs, x, t, ctx, bias, pooled) -> torch.Tensor:
        fam, s = self.family, self.stats
        n_blocks = len(fam.blocks)
        s.block_evals_full += n_blocks * x.shape[0]
        if all(r.cache is None for r in reqs):
            # whole-forward graphs (speech families) where the graphs hold them, else block runs
            out = self.graphs.forward(x, t, ctx, bias, pooled, self._shapes) if self.graphs is not None else None
            if out is None:
                st = fam.embed(x, t, ctx, bias, pooled, self._shapes)
                self._blocks(st, 0, n_blocks)
                out = fam.final(st)
            for r in reqs:
                r.block_evals += n_blocks
            s.block_evals += n_blocks * x.shape[0]
            return out
        st = fam.embed(x, t, ctx, bias, pooled, self._shapes)
        st.x = self._cached_blocks(reqs, st)
        return fam.final(st)

    def _cached_blocks(self, reqs: list[DiTRequest], st: BlockState) -> torch.Tensor:
        """Run the blocks with per-request skipping; returns the image tokens after the last block."""
        fam, s = self.family, self.stats
        n_blocks = len(fam.blocks)
        spans = _spans(reqs)
        for r in reqs:
            if r.cache is not None and r.cache_state is None:
                r.cache_state = StepCacheState(r.cache, fam.teacache_polynomial(r))
        forced = [r.cache is not None and r.cache_state.forced(r.step_idx, r.total_steps) for r in reqs]
        x_in = st.x                                               # [B, N, D] before block 0

        # TeaCache: decide before block 0 from the family's signal (the modulated input, Wan: the time embedding)
        skip_all = [False] * len(reqs)
        tea = [j for j, r in enumerate(reqs) if r.cache is not None and r.cache.method == "teacache"]
        if tea:
            mod = fam.teacache_signal(st)
            dec = decide([reqs[j].cache_state for j in tea], [mod[slice(*spans[j])] for j in tea],
                         [forced[j] for j in tea])
            for j, d in zip(tea, dec):
                skip_all[j] = d

        # block 0 on every row that is not skipping everything
        active = [j for j in range(len(reqs)) if not skip_all[j]]
        sub = self._subset(st, spans, active)
        x0_in = sub.x
        if active:
            self._blocks(sub, 0, 1)
        local = _spans([reqs[j] for j in active])

        # first-block cache: decide from block 0's residual
        skip_rest = [False] * len(reqs)
        fb = [k for k, j in enumerate(active) if reqs[j].cache is not None and reqs[j].cache.method == "fbcache"]
        r1 = {}
        if fb:
            for k in fb:
                a, b = local[k]
                r1[k] = sub.x[a:b] - x0_in[a:b]
            dec = decide([reqs[active[k]].cache_state for k in fb], [r1[k] for k in fb],
                         [forced[active[k]] for k in fb])
            for k, d in zip(fb, dec):
                skip_rest[active[k]] = d

        # the remaining blocks on the rows that must recompute
        rest = [k for k, j in enumerate(active) if not skip_rest[j]]
        x1 = sub.x                                                # after block 0 (the active rows)
        sub2 = self._subset(sub, local, rest)
        if rest:
            self._blocks(sub2, 1, n_blocks)
        local2 = _spans([reqs[active[k]] for k in rest])

        # assemble every row's output and refresh the residuals of the rows that ran in full
        out = torch.empty_like(x_in)
        pos_rest = {k: local2[q] for q, k in enumerate(rest)}
        for j, r in enumerate(reqs):
            a, b = spans[j]
            if skip_all[j]:
                out[a:b] = x_in[a:b] + r.cache_state.residual
                r.cache_skips += 1
                s.cache_skips += 1
                continue
            k = active.index(j)
            la, lb = local[k]
            if skip_rest[j]:
                out[a:b] = x1[la:lb] + r.cache_state.residual
                r.block_evals += 1
                r.cache_skips += 1
                s.cache_skips += 1
                s.block_evals += b - a
                continue
            qa, qb = pos_rest[k]
            out[a:b] = sub2.x[qa:qb]
            r.block_evals += n_blocks
            s.block_evals += n_blocks * (b - a)
            if r.cache is not None:
                base = x_in[a:b] if r.cache.method == "teacache" else x1[la:lb]
                r.cache_state.residual = out[a:b] - base
        return out

    def _blocks(self, st: BlockState, lo: int, hi: int) -> None:
        """Blocks [lo, hi) on ``st`` in place: a CUDA graph replay where one fits, else eagerly."""
        if hi <= lo or (self.graphs is not None and self.graphs.run(st, lo, hi)):
            return
        for i in range(lo, hi):
            self.family.run_block(i, st)

    def _subset(self, st: BlockState, spans: list[tuple[int, int]], keep: list[int]) -> BlockState:
        """The rows of requests ``keep`` (indices into ``spans``) as a new state (or ``st`` if all)."""
        if len(keep) == len(spans):
            return replace(st, text_pack=None)
        rows = [i for k in keep for i in range(*spans[k])]
        return st.select(torch.tensor(rows, dtype=torch.long, device=st.x.device), rows)
