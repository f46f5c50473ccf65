"""What one engine step runs: the scheduler's output, the runner's input."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni_ray.ar.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)      # decodes (q_len 1) first, then prefills
    num_new: list[int] = field(default_factory=list)        # tokens computed for each this step
    num_decodes: int = 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)
