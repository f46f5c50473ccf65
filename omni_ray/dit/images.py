"""Finished latents -> outputs: VAE decode in batches, then PIL images or float arrays
(as the diffusers pipelines post-process: ``(x / 2 + 0.5).clamp(0, 1)``, uint8 by rounding)."""

from __future__ import annotations

import torch
from PIL import Image

from omni_ray.dit.families.base import DiTFamily
from omni_ray.dit.request import DiTRequest


@torch.no_grad()
def decode_outputs(family: DiTFamily, reqs: list[DiTRequest], vae_batch_size: int,
                   vae_batch_pixels: int | None = None) -> int:
    """Set ``r.images`` for each finished request; returns the number of VAE batches run. A batch holds at
    most ``vae_batch_size`` images and ``vae_batch_pixels`` pixels, all of one size; a request's images
    stay in one batch."""
    for r in reqs:
        if r.output_type == "latent":
            r.images = list(r.latents.float().cpu())
    batches, chunk = 0, []
    for r in (r for r in reqs if r.output_type != "latent"):     # one image size per batch
        n = sum(c.num_images for c in chunk) + r.num_images
        if chunk and (n > vae_batch_size or (chunk[0].height, chunk[0].width) != (r.height, r.width)
                      or (vae_batch_pixels is not None and n * r.height * r.width > vae_batch_pixels)):
            _decode(family, chunk)
            batches, chunk = batches + 1, []
        chunk.append(r)
    if chunk:
        _decode(family, chunk)
        batches += 1
    return batches


def _decode(family: DiTFamily, reqs: list[DiTRequest]) -> None:
    latents = family.unpack_latents(torch.cat([r.latents for r in reqs]), reqs[0].height, reqs[0].width)
    images = family.decode(latents)
    images = (images.float() / 2 + 0.5).clamp(0, 1)                          # [B, 3, H, W]
    u8 = f32 = None
    if any(r.output_type == "pil" for r in reqs):
        u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if any(r.output_type == "np" for r in reqs):
        f32 = images.permute(0, 2, 3, 1).cpu().numpy()
    off = 0
    for r in reqs:
        sl = slice(off, off + r.num_images)
        off += r.num_images
        r.images = [Image.fromarray(a) for a in u8[sl]] if r.output_type == "pil" else list(f32[sl])
