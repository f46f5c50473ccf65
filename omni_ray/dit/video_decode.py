"""A finished video's VAE decode, a few latent frames at a time, between engine steps.

Decoding 81 frames at 480p takes seconds of GPU time: run at once, it would stall every other
request's denoising for that long. ``AutoencoderKLWan`` is causal in time: it decodes one latent
frame after another, carrying each causal convolution's last frames in a feature cache. A
``VideoDecode`` holds its own feature cache (the VAE module's ``_feat_map`` is shared state, this
is not), so the engine can decode ``chunk`` latent frames of a video per engine step, interleaved
with the other requests' denoising steps, and several videos' decodes can be in progress at once.
The frames equal ``vae.decode``'s (the same decoder calls in the same order).

Frames larger than ``untiled_max_pixels`` are decoded in overlapping spatial tiles (the VAE's
``tile_sample_*`` sizes), each tile with its own feature cache, and blended at the end exactly as
``vae.tiled_decode`` blends them, so 720p fits in memory beside the transformer.
"""

from __future__ import annotations

import torch

UNTILED_MAX_PIXELS = 480 * 832        # 480p decodes whole frames (as diffusers' default); larger ones tile


class VideoDecode:
    def __init__(self, vae, z: torch.Tensor, untiled_max_pixels: int = UNTILED_MAX_PIXELS):
        """``z``: the VAE's latents [n, C, F', h, w] (already denormalized)."""
        self.vae = vae
        self.num_frames = z.shape[2]
        self.done_frames = 0
        s = vae.spatial_compression_ratio
        h, w = z.shape[-2:]
        self.tiled = h * w * s * s > untiled_max_pixels
        self.x = z
        self.tile_sizes = (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height,
                           vae.tile_sample_stride_width)         # read once: the VAE's may change meanwhile
        if self.tiled:
            lh, lw = vae.tile_sample_min_height // s, vae.tile_sample_min_width // s
            sh, sw = vae.tile_sample_stride_height // s, vae.tile_sample_stride_width // s
            self.grid = [[(slice(i, i + lh), slice(j, j + lw)) for j in range(0, w, sw)] for i in range(0, h, sh)]
        else:
            self.grid = [[(slice(None), slice(None))]]
        n_conv = vae._cached_conv_counts["decoder"]
        self.caches = [[[None] * n_conv for _ in row] for row in self.grid]
        self.out: list[list[list[torch.Tensor]]] = [[[] for _ in row] for row in self.grid]
        self._video: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.done_frames >= self.num_frames

    @torch.no_grad()
    def step(self, frames: int) -> None:
        """Decode the next ``frames`` latent frames (of every tile)."""
        vae = self.vae
        for k in range(self.done_frames, min(self.done_frames + frames, self.num_frames)):
            for r, row in enumerate(self.grid):
                for c, (hs, ws) in enumerate(row):
                    z = vae.post_quant_conv(self.x[:, :, k:k + 1, hs, ws])
                    self.out[r][c].append(vae.decoder(z, feat_cache=self.caches[r][c], feat_idx=[0],
                                                      first_chunk=(k == 0)))
            self.done_frames = k + 1
        if self.finished:
            self.caches = []

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        """The video [n, 3, F, H, W] in [-1, 1] (after the last ``step``)."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        if self._video is None:
            patch = self.vae.config.patch_size
            tiles = [[torch.cat(frames, dim=2) for frames in row] for row in self.out]
            out = self._blend(tiles) if self.tiled else tiles[0][0]      # blending writes into the tiles
            if patch is not None:
                out = unpatchify(out, patch_size=patch)
            self._video, self.out = out.clamp(-1.0, 1.0), []
        return self._video

    def _blend(self, rows: list[list[torch.Tensor]]) -> torch.Tensor:
        """``AutoencoderKLWan.tiled_decode``'s blending of the decoded tiles."""
        vae, patch = self.vae, self.vae.config.patch_size or 1
        s = vae.spatial_compression_ratio
        h, w = self.x.shape[-2:]
        sample_h, sample_w = h * s // patch, w * s // patch
        min_h, min_w, stride_h, stride_w = (v // patch for v in self.tile_sizes)
        blend_h, blend_w = min_h - stride_h, min_w - stride_w
        result_rows = []
        for i, row in enumerate(rows):
            result_row = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = vae.blend_v(rows[i - 1][j], tile, blend_h)
                if j > 0:
                    tile = vae.blend_h(row[j - 1], tile, blend_w)
                result_row.append(tile[:, :, :, :stride_h, :stride_w])
            result_rows.append(torch.cat(result_row, dim=-1))
        return torch.cat(result_rows, dim=3)[:, :, :, :sample_h, :sample_w]


def video_outputs(video: torch.Tensor, output_type: str) -> list:
    """[n, 3, F, H, W] in [-1, 1] -> one array per video: uint8 [F, H, W, 3] (``"pil"``: rounded, as
    diffusers' ``numpy_to_pil``) or float32 [F, H, W, 3] in [0, 1] (``"np"``, as ``postprocess_video``)."""
    frames = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)
    if output_type == "pil":
        return list((frames * 255).round().to(torch.uint8).cpu().numpy())
    return list(frames.cpu().numpy())
