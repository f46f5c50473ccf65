"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A kernel launched with PDL may start while the kernel before it in the stream is still running:
its programs are scheduled once every program of the previous kernel has called
``gdc_launch_dependents`` (our kernels do so first thing), do the work that does not depend on
the previous kernel (load weights, block tables, positions), then ``gdc_wait`` until the previous
kernel has finished and its writes are visible. At batch 1, where a decode step is ~200 short
kernels, this hides most of each launch's ramp-up behind the kernel before it. CUDA graphs keep
the dependency (programmatic edges).

Rules every PDL kernel here follows: every program calls ``gdc_wait`` (unconditionally) before it
reads anything the previous kernels write and before it writes anything; inputs read before the
wait are ones written earlier in the step by ordinary (fully serialised) kernels, or constants.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """PDL for kernels on ``t``'s device: CUDA with compute capability 9.0 or later."""
    return t.is_cuda and _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())
