"""One image request and its own denoising state (latents, scheduler, generator, step cache)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from omni_ray.dit.families.base import Cond
from omni_ray.dit.params import StepCacheParams


class Status(enum.Enum):
    WAITING = "waiting"        # validated, not yet admitted (no GPU memory held)
    RUNNING = "running"        # admitted: latents allocated, stepping
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False)
class DiTRequest:
    request_id: str
    prompt: str | None
    height: int
    width: int
    num_steps: int
    guidance_scale: float
    seed: int
    num_images: int
    negative_prompt: str | None
    cache: StepCacheParams | None
    prompt_embeds: torch.Tensor | None = None      # [T, W] given by the caller (skips the text encoder)
    prompt_mask: torch.Tensor | None = None        # [T]
    output_type: str = "pil"                       # "pil" | "np" | "latent"
    negative_prompt_embeds: torch.Tensor | None = None   # [T', W] the negative's conditioning, given by the caller
    negative_prompt_mask: torch.Tensor | None = None     # [T']
    image: Any = None                              # input image (PIL, RGB) of an edit model
    cfg: bool | None = None                        # runs classifier-free guidance (None: guidance_scale > 1)
    arrival: int = 0
    num_frames: int = 1                            # video models: frames per video
    boundary: float | None = None                  # two-expert models: the timestep where the second takes over
    speech: Any = None                             # speech families: SpeechInput (codec tokens, voice), speech.py

    status: Status = Status.WAITING
    cond: Cond | None = None
    neg_cond: Cond | None = None
    latents: torch.Tensor | None = None            # [n, C, h, w] (packed families: [n, tokens, C])
    cond_latents: torch.Tensor | None = None       # [n, M, C] input-image tokens after the noise ones (edit)
    shapes: tuple = ()                             # the family's latent_shapes (part of the batching key)
    scheduler: Any = None
    timesteps: torch.Tensor | None = None          # CPU
    generator: torch.Generator | None = None
    step_idx: int = 0
    key: tuple = ()                                # requests with equal keys can share a forward
    last_served: int = -1
    cache_state: Any = None
    block_evals: int = 0                           # transformer blocks this request went through
    cache_skips: int = 0                           # steps on which it skipped blocks
    images: list | None = None
    error: BaseException | None = None
    extra: dict = field(default_factory=dict)

    @property
    def batch_key(self) -> tuple:
        """``key``, plus the expert of the next step on two-expert models (a forward uses one)."""
        if self.boundary is None or self.is_done:
            return self.key
        return (*self.key, int(float(self.timesteps[self.step_idx]) < self.boundary))

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0 if self.cfg is None else self.cfg

    @property
    def num_rows(self) -> int:
        """Transformer rows per step: images, doubled under classifier-free guidance."""
        return self.num_images * (2 if self.do_cfg else 1)

    @property
    def total_steps(self) -> int:
        return len(self.timesteps) if self.timesteps is not None else self.num_steps

    @property
    def is_done(self) -> bool:
        return self.timesteps is not None and self.step_idx >= len(self.timesteps)

    @property
    def is_finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)

    def summary(self) -> dict:
        return {"seed": self.seed, "steps": self.total_steps, "block_evals": self.block_evals,
                "cache_skips": self.cache_skips}
