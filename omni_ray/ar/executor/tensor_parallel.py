"""Tensor-parallel model runner: the engine's ``runner`` when ``tensor_parallel_size > 1``.

Every rank holds a ``ModelRunner`` over its shard (column/row/vocab-parallel layers that read
only their slices of the safetensors files; KV cache sized per rank, the smallest block count
agreed by all). Rank 0 is this process and runs the engine; ranks 1..N-1 are Ray actors of a
``WorkerGroup``. Each step, rank 0

1. posts a small header of ints to the workers over the gloo command group (``WorkerGroup.post``:
   one 512-byte broadcast, nothing pickled, no Ray call),
2. broadcasts the step's inputs as one tensor on the tensor group (NCCL on GPU):
   decode steps send the CUDA graphs' own input buffer ``g_in[:bs]`` (int32 rows of token,
   position, context length and block table), prefill/mixed steps one packed int64 tensor,
3. runs the same forward as the workers (the all-reduces inside pace the ranks); only rank 0
   samples and returns hidden states.

CUDA graphs are captured on every rank (same batch sizes, same order, NCCL all-reduces inside),
and multi-step decode replays them on every rank: the in-graph greedy token comes from logits
that are all-gathered, so every rank feeds the same token to its next step; a sampled batch's
tokens are drawn by rank 0 alone and broadcast to the others between the forwards.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from omni_ray.ar.batch import ScheduledBatch
from omni_ray.ar.layers.attention import AttnMetadata
from omni_ray.ar.layers.parallel import TPContext
from omni_ray.ar.models import ArchConfig
from omni_ray.ar.worker.model_runner import BT, ModelRunner, StepOutput
from omni_ray.cluster.worker_group import RankContext, WorkerGroup
from omni_ray.config import AREngineConfig
from omni_ray.errors import EngineError, OmniError

DECODE, EAGER = 1, 2      # header[0] of a step


def time_decode_forwards(runner: ModelRunner, bs: int = 1, iters: int = 50) -> float:
    """Seconds per decode forward of ``bs`` dummy rows (a CUDA-graph replay on GPU) with no host step
    work around it: the device side of a decode step. The rows only touch the scratch KV block.
    Tensor parallel: every rank must run it at the same time (``group.call``)."""
    r = runner
    rows = r.g_in[:bs]
    rows.zero_()
    rows[:, 2] = 1                                   # position 0, context 1
    rows[:, BT:] = r.num_blocks                       # every block-table entry -> the scratch block
    splits = 0 if r.graphs else r._splits(bs, iters + 2)
    sync = torch.cuda.synchronize if r.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        r._decode_forwards(bs, 1, splits)            # warm up
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            r._decode_forwards(bs, 1, splits)
        sync()
        dt = (time.perf_counter() - t0) / iters
    rows.zero_()
    return dt


class TPShard:
    """One rank's model runner; on workers, ``handle_post`` replays rank 0's steps."""

    def __init__(self, ctx: RankContext, config: AREngineConfig, model_path: str, arch: ArchConfig):
        self.ctx = ctx
        tp = TPContext(ctx.rank, ctx.size, ctx.group)
        self.runner = ModelRunner(config, Path(model_path), arch, tp=tp, device=ctx.device)

    def load_stats(self):
        return self.runner.load_stats

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.runner.model.parameters())

    def time_decode_forwards(self, bs: int = 1, iters: int = 50) -> float:
        return time_decode_forwards(self.runner, bs, iters)

    def info(self) -> dict:
        r = self.runner
        return {"rank": self.ctx.rank, "device": str(r.device), "num_blocks": r.num_blocks,
                "graphs": sorted(r.graphs), "kv_heads": r.model.layers[0].self_attn.nkv}

    @torch.inference_mode()
    def handle_post(self, v: np.ndarray) -> None:
        r, group = self.runner, self.ctx.group
        if v[0] == DECODE:
            bs, num_steps, splits, sampled = (int(x) for x in v[1:5])
            dist.broadcast(r.g_in[:bs], src=0, group=group)
            r._decode_forwards(bs, num_steps, splits, sampled)
        elif v[0] == EAGER:
            n, b, w, s, nd, max_q, max_ctx, splits = (int(x) for x in v[1:9])
            buf = torch.empty(3 * n + 2 * b + 1 + b * w + s, dtype=torch.int64, device=r.device)
            dist.broadcast(buf, src=0, group=group)
            ids, pos, slots, ctx, cu, table, rows = torch.split(buf, [n, n, n, b, b + 1, b * w, s])
            meta = AttnMetadata(slot_mapping=slots, context_lens=ctx.to(torch.int32),
                                block_tables=table.view(b, w).to(torch.int32), cu_seqlens_q=cu.to(torch.int32),
                                num_decodes=nd, max_query_len=max_q, max_context_len=max_ctx, decode_splits=splits,
                                decode_locks=r.decode_locks)
            if r.backend == "torch":           # host copies the PyTorch attention reads (CPU: free)
                meta.q_lens, meta.ctx_lens = cu.diff().tolist(), ctx.tolist()
            r._forward(ids, pos, meta, (), rows if s else None)
        else:
            raise EngineError(f"tensor-parallel rank {self.ctx.rank}: unknown step kind {int(v[0])}")


def make_shard(config: AREngineConfig, model_path: str, arch: ArchConfig, ctx: RankContext) -> TPShard:
    return TPShard(ctx, config, model_path, arch)


class _Rank0Peers:
    """Rank 0's half of a step, called by its ModelRunner right before its own forward."""

    def __init__(self, group: WorkerGroup, runner: ModelRunner):
        self.group, self.runner, self.tp_group = group, runner, group.group

    def decode(self, bs: int, num_steps: int, splits: int, sampled: int = 0) -> None:
        self.group.post((DECODE, bs, num_steps, splits, sampled))
        dist.broadcast(self.runner.g_in[:bs], src=0, group=self.tp_group)

    def forward(self, ids, pos, meta: AttnMetadata, rows) -> None:
        b, w = meta.block_tables.shape
        s = 0 if rows is None else rows.numel()
        self.group.post((EAGER, ids.numel(), b, w, s, meta.num_decodes, meta.max_query_len, meta.max_context_len,
                         meta.decode_splits))
        parts = [ids, pos, meta.slot_mapping, meta.context_lens, meta.cu_seqlens_q, meta.block_tables.reshape(-1)]
        buf = torch.cat([p.to(torch.int64) for p in parts + ([rows] if s else [])])
        dist.broadcast(buf, src=0, group=self.tp_group)


def _current_placement_group():
    import ray
    if not ray.is_initialized():
        return None
    return ray.util.get_current_placement_group()


class TPModelRunner:
    """Same interface as ModelRunner (``run``, ``num_blocks``, ``device``, ...), spread over
    ``tensor_parallel_size`` ranks. Adds ``check_health``, ``add_failure_callback``, ``shutdown``."""

    def __init__(self, config: AREngineConfig, model_path: Path, arch: ArchConfig):
        p = config.parallel
        pg = _current_placement_group()            # inside a Serve replica: its bundles, replica = bundle 0
        self.group = WorkerGroup(
            p.tensor_parallel_size, functools.partial(make_shard, config, str(model_path), arch),
            device=config.device, backend=p.backend, strategy=p.placement_strategy, placement_group=pg,
            bundle_offset=1 if pg is not None else None, timeout_s=p.timeout_s, name="tensor-parallel")
        self.shard: TPShard = self.group.rank0
        self.runner: ModelRunner = self.shard.runner
        self.runner.peers = _Rank0Peers(self.group, self.runner)

    def __getattr__(self, name):               # num_blocks, device, model, graphs, block_bytes, ...
        if name in ("runner", "group", "shard"):
            raise AttributeError(name)
        return getattr(self.runner, name)

    def run(self, batch: ScheduledBatch, num_steps: int = 1) -> StepOutput:
        if self.group.failed:
            self.group.check_health()
        try:
            with self.group.lock:
                out = self.runner.run(batch, num_steps) if num_steps > 1 else self.runner.run(batch)
        except OmniError:
            raise
        except Exception as err:               # a collective failed: a rank is gone
            raise self.group.failure(err) from err
        if self.group.failed:                  # aborted under us (NCCL): the numbers are not to be trusted
            self.group.check_health()
        return out

    def check_health(self) -> None:
        self.group.check_health()

    def add_failure_callback(self, fn) -> None:
        self.group.add_failure_callback(fn)

    def describe(self) -> dict:
        return {"tensor_parallel_size": self.group.size, "backend": self.group.backend,
                "worker_pids": list(self.group.worker_pids), "healthy": not self.group.failed}

    def load_stats(self) -> list:
        """Every rank's ReadStats (what it read from the checkpoint)."""
        return self.group.call_all("load_stats")

    def rank_info(self) -> list[dict]:
        return self.group.call_all("info")

    def shutdown(self) -> None:
        self.group.shutdown()
