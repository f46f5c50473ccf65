"""Per-step input rows of decode runs: what the decode CUDA graphs add to each row's input embedding.

A model fed a row per decode step (the Qwen2.5-Omni talker: the thinker's state of the next text
position, ``InputEmbeds.step(k)``) reads them from one device buffer, ``[steps, bs, E]`` per graph batch
size ``bs`` (one flat allocation, viewed per size so that both sides of the copy are contiguous): the
forward of step j of a run adds row ``[j, i]`` to the embedding of the token that row i feeds. Rows of
sequences without one are zero (adding zero changes nothing). The runner fills the rows of a whole run
(``num_steps`` steps) on the host, in one of two pinned buffers (a resumed run is filled while the run
before it still reads the other), then one copy; the graphs index the buffer with the device's step
counter, so no host work sits between the forwards.

Only models that take step rows get this buffer and capture their decode graphs reading it: text
models' graphs do not change.
"""

from __future__ import annotations

import torch

from omni_ray.ar.sequence import Sequence


class StepRows:
    def __init__(self, steps: int, max_rows: int, width: int, dtype: torch.dtype, device: torch.device):
        cuda = device.type == "cuda"
        self.steps, self.max_rows, self.width = steps, max_rows, width
        self.rows = torch.zeros(steps * max_rows * width, dtype=dtype, device=device)
        self.host = [torch.zeros(steps * max_rows * width, dtype=dtype, pin_memory=cuda) for _ in range(2)]
        self.index = torch.arange(max_rows, device=device)          # every row takes its add

    def view(self, bs: int, t: torch.Tensor | None = None) -> torch.Tensor:
        """The buffer (or host buffer ``t``) as ``[steps, bs, E]``."""
        t = self.rows if t is None else t
        return t[:self.steps * bs * self.width].view(self.steps, bs, self.width)

    def fill(self, seqs: list[Sequence], num_steps: int, bs: int, buf: int, offset: int = 0) -> None:
        """The rows of the next ``num_steps`` forwards of ``seqs`` (rows [:len(seqs)] of a batch of ``bs``)
        to the device. ``offset``: how many tokens the device is ahead of the sequences (a run queued
        behind one in flight starts ``offset`` steps later than the sequences' lengths say)."""
        host = self.view(bs, self.host[buf])[:num_steps]
        host.zero_()
        for i, seq in enumerate(seqs):
            e = seq.input_embeds
            if e is None:
                continue
            first = len(seq) - 1 - len(e) + offset        # decode step of the token fed first (0: position L)
            for j in range(num_steps):
                row = e.step(first + j)
                if row is not None:
                    host[j, i] = row
        self.view(bs)[:num_steps].copy_(host, non_blocking=True)

    def read(self, step: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``add_embeds`` of the forward at device step ``step`` ([1] int64): (rows [bs], values [bs, E])."""
        return self.index[:bs], self.view(bs).index_select(0, step)[0]
