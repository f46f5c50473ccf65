"""Wan2.2 TI2V-5B: text- and image-to-video in one checkpoint (``WanPipeline`` with ``expand_timesteps``
in model_index.json), as diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` run it.

* The Wan2.2 VAE: 48 latent channels, patchified (2 x 2) and residual, spatial factor 16, its own
  ``latents_mean`` / ``latents_std`` (all read from the VAE config); the transformer's patches make
  sizes multiples of 32. Default size 704 x 1280, 121 frames (24 fps, 5 s), as the model card runs it.
* Image-to-video (a request with ``image=``): the image's VAE latents (one frame, normalized) replace
  the first latent frame of the transformer's input at every step, and its tokens get timestep 0 while
  the others get the step's t (the pipelines' ``first_frame_mask``: per-token timesteps); the scheduler
  steps the latents as they are, and the first frame is put back after the last step. No CLIP, no extra
  input channels. Without an image it is text-to-video (every token at t, as the pipeline's all-ones mask).
* Per-token timesteps are per row: a row gives (first frame's t, the others' t) (``row_timestep``), so
  text- and image-to-video requests at any step of their own schedules share a forward; the blocks
  modulate the first frame's tokens and the others' with their own timestep projections (``head_tokens``),
  never materializing diffusers' [B, N, 6, D] per-token tables. A batch of text-to-video rows only runs
  with one timestep per row, as Wan2.1 does.
"""

from __future__ import annotations

import torch

from omni_ray.dit.families.wan import WanFamily, _bad


class WanTI2VFamily(WanFamily):
    expand_timesteps = True
    default_num_frames = 121

    @property
    def default_hw(self) -> tuple[int, int]:
        return 704, 1280

    @property
    def default_size(self) -> int:
        return 704

    def check_image(self, image) -> tuple[int, int]:
        """An optional first frame (image-to-video); the output's default size is the model's."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            _bad("image", f"image must be a PIL.Image, got {type(image).__name__}")
        return self.default_hw

    @torch.no_grad()
    def prepare_request(self, r) -> None:
        from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents

        super().prepare_request(r)                                   # the noise first, as the pipelines
        if r.image is None:
            return
        image = self.video_processor.preprocess(r.image.convert("RGB"), height=r.height, width=r.width)
        image = image.to(self.device, torch.float32).unsqueeze(2)                          # [1, 3, 1, H, W]
        lat = retrieve_latents(self.vae.encode(image.to(self.vae.dtype)), sample_mode="argmax")
        lat = (lat.to(torch.float32) - self.latents_mean) * (1.0 / self.latents_std)      # [1, C, 1, h, w]
        r.cond_latents = lat.repeat(r.latents.shape[0], 1, 1, 1, 1)

    def model_input(self, r, latents: torch.Tensor) -> torch.Tensor:
        """The first latent frame replaced by the image's (the pipeline's (1 - mask) * condition + mask * latents)."""
        if r.cond_latents is None:
            return latents
        return torch.cat([r.cond_latents.to(latents.dtype), latents[:, :, 1:]], dim=2)

    def row_timestep(self, r, t) -> float | tuple[float, float]:
        """Image-to-video: (0 for the first frame's tokens, t for the others); text-to-video: t."""
        return float(t) if r.cond_latents is None else (0.0, float(t))

    def final_latents(self, r) -> torch.Tensor:
        return self.model_input(r, r.latents)
