"""The decode-step CUDA graphs of a ``ModelRunner``: which batch sizes get one, and their capture.

A graph replays ``runner._decode_body`` on rows ``[:bs]`` of the runner's persistent decode
buffers (``g_in`` ...); the runner replays ``runner.graphs[bs]``. Graphs of steps with prompt
tokens are captured by ``mixed_graphs.MixedStepGraphs``, in the pool these leave.
"""

from __future__ import annotations

import logging

import torch

from omni_ray.capture_lock import capture_lock

log = logging.getLogger(__name__)


def decode_graph_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a decode graph: 1, 2, 4, 8, then every 16 up to max_num_seqs (at most 512)."""
    top = min(max_num_seqs, 512)
    sizes = [1, 2, 4, 8] + list(range(16, top + 1, 16))
    return sorted({s for s in sizes if s <= top} | {top})


def capture_decode_graphs(runner):
    """Decode graphs of ``runner.graph_sizes``, largest first, in one memory pool, into
    ``runner.graphs``; returns the pool (for the mixed-step graphs)."""
    sizes = runner.graph_sizes
    pool = None
    with torch.inference_mode():
        for bs in reversed(sizes):
            meta = runner._decode_meta(bs, runner._splits(bs, runner.max_model_len))
            for _ in range(2):  # warm up (compiles kernels outside the capture)
                runner.g_step.zero_()
                runner._decode_body(bs, meta)
            runner.g_step.zero_()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with capture_lock(), torch.cuda.graph(g, pool=pool, stream=runner.stream):   # green (cuda_stream_sms)
                runner._decode_body(bs, meta)
            pool = g.pool()
            runner.graphs[bs] = g
    torch.cuda.synchronize()
    log.info("captured %d decode CUDA graphs (batch sizes up to %d)", len(sizes), sizes[-1])
    return pool
