"""A toy rank object for the WorkerGroup tests (importable by the Ray workers)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class ToyRank:
    def __init__(self, ctx, scale: float = 1.0):
        self.ctx, self.scale = ctx, scale
        self.posts: list[list[int]] = []

    def all_reduce(self, n: int) -> list[float]:
        x = torch.full((n,), float(self.ctx.rank + 1) * self.scale)
        dist.all_reduce(x, group=self.ctx.group)
        return x.tolist()

    def whoami(self) -> dict:
        import ray
        pg = ray.get_runtime_context().get_placement_group_id() if ray.is_initialized() else None
        return {"rank": self.ctx.rank, "pid": os.getpid(), "device": str(self.ctx.device), "placement_group": pg}

    def handle_post(self, values) -> None:
        self.posts.append(values.tolist())
        x = torch.tensor([float(values.sum())])
        dist.all_reduce(x, group=self.ctx.group)     # the post's collective half

    def posted(self) -> list:
        return self.posts

    def boom(self) -> None:
        if self.ctx.rank == 1:
            raise ValueError("boom on rank 1")
        dist.all_reduce(torch.zeros(1), group=self.ctx.group)


def make_toy(ctx, scale: float = 1.0) -> ToyRank:
    return ToyRank(ctx, scale)
