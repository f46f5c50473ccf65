"""PixArt-Sigma (``PixArtTransformer2DModel``): T5 captions by cross-attention, adaLN-single timestep
modulation, SD VAE, DPM-Solver++.

Without a text encoder in its directory the same transformer is the LLM-conditioned variant:
``caption_channels`` is the LLM's hidden size and requests bring the LLM's prompt hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_ray.dit.families.base import BlockState, Cond, DiTFamily, unpatchify
from omni_ray.dit.families.pixart_block import Kernels, PixArtBlock
from omni_ray.errors import ConfigError


class PixArtFamily(DiTFamily):
    pipeline_class = "PixArtSigmaPipeline"
    default_steps = 20
    default_guidance = 4.5
    default_max_sequence_length = 300
    supports_caption_mask = True

    def __init__(self, comps: dict, device, dtype, max_sequence_length):
        super().__init__(comps, device, dtype, max_sequence_length)
        self.text_encoder = comps.get("text_encoder")
        self.tokenizer = comps.get("tokenizer")
        tr = self.transformer
        if tr.caption_projection is None:
            raise ConfigError("PixArt transformer without caption_channels is not supported")
        if tr.use_additional_conditions:
            raise ConfigError("PixArt-Alpha micro-conditions (use_additional_conditions) are not supported")
        if (self.text_encoder is None) != (self.tokenizer is None):
            raise ConfigError("a PixArt model needs both text_encoder and tokenizer, or neither")
        if self.text_encoder is None and max_sequence_length is None:
            self.max_sequence_length = 1024        # LLM prompts run longer than T5 captions
        self.out_channels = tr.out_channels
        self.kernels = Kernels()
        self.block_fns = [PixArtBlock(b, self.kernels) for b in self.blocks]

    # ------------------------------------------------------------------ conditioning
    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None

    @property
    def caption_dim(self) -> int:
        return self.transformer.config.caption_channels

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # PixArtSigmaPipeline's preprocessing without caption cleaning; padding to the batch's
        # longest prompt is exact (T5 masks the padding).
        texts = [p.lower().strip() for p in prompts]
        tok = self.tokenizer(texts, padding="longest", max_length=self.max_sequence_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        if ids.shape[1] == 0:      # only empty captions and no EOS: one padding token, masked
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.full((len(texts), 1), pad, dtype=torch.long, device=self.device)
            mask = torch.zeros_like(ids)
        embeds = self.text_encoder(ids, attention_mask=mask)[0]
        return embeds.to(self.dtype), mask

    @torch.no_grad()
    def project(self, embeds: torch.Tensor, mask: torch.Tensor) -> Cond:
        tokens = self.transformer.caption_projection(embeds.to(self.device, self.dtype)[None])[0]
        return Cond(tokens=tokens, mask=mask.to(self.device))

    def batch_cond(self, conds: list[Cond]):
        t_max = max(c.tokens.shape[0] for c in conds)
        ctx = torch.stack([F.pad(c.tokens, (0, 0, 0, t_max - c.tokens.shape[0])) for c in conds])
        mask = torch.stack([F.pad(c.mask, (0, t_max - c.mask.shape[0])) for c in conds])
        bias = ((1 - mask.to(self.dtype)) * -10000.0).unsqueeze(1)      # [B, 1, T], as diffusers builds it
        return ctx, bias, None

    # ------------------------------------------------------------------ sampling
    def prepare_latents(self, n, height, width, generator, scheduler):
        return super().prepare_latents(n, height, width, generator, scheduler) * scheduler.init_noise_sigma

    def step_kwargs(self, generator):
        return {"generator": generator}    # as the pipeline passes it (used by SDE solvers)

    def model_output(self, pred):
        if self.out_channels // 2 == self.in_channels:    # learned sigma: keep the epsilon half
            return pred.chunk(2, dim=1)[0]
        return pred

    # ------------------------------------------------------------------ transformer
    def _pos(self, h: int, w: int) -> torch.Tensor:
        pe = self.transformer.pos_embed
        if (h, w) not in self._pos_cache:
            if (pe.height, pe.width) == (h, w):
                pos = pe.pos_embed
            else:
                from diffusers.models.embeddings import get_2d_sincos_pos_embed
                pos = get_2d_sincos_pos_embed(embed_dim=pe.pos_embed.shape[-1], grid_size=(h, w),
                                              base_size=pe.base_size, interpolation_scale=pe.interpolation_scale,
                                              device=self.device, output_type="pt").float().unsqueeze(0)
            self._pos_cache[(h, w)] = pos
        return self._pos_cache[(h, w)]

    def embed(self, x, t, ctx, ctx_bias, pooled, shapes=()) -> BlockState:
        tr, p = self.transformer, self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        tokens = tr.pos_embed.proj(x).flatten(2).transpose(1, 2)             # [B, N, D]
        tokens = (tokens + self._pos(*grid)).to(tokens.dtype).contiguous()
        temb, emb = tr.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=x.shape[0],
                                    hidden_dtype=tokens.dtype)              # [B, 6D], [B, D]
        return BlockState(x=tokens, ctx=ctx, ctx_bias=ctx_bias, temb=temb, emb=emb, grid=grid)

    def fuse_elementwise(self) -> None:
        self.kernels.fuse()

    def run_block(self, i: int, st: BlockState) -> None:
        st.x = self.block_fns[i](st.x, st.ctx, st.ctx_bias, st.temb)

    def modulated_input(self, st: BlockState) -> torch.Tensor:
        blk = self.blocks[0]
        shift, scale = (blk.scale_shift_table[None] + st.temb.reshape(st.x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
        return blk.norm1(st.x) * (1 + scale) + shift

    def final(self, st: BlockState) -> torch.Tensor:
        tr = self.transformer
        shift, scale = (tr.scale_shift_table[None] + st.emb[:, None]).chunk(2, dim=1)
        x = tr.norm_out(st.x) * (1 + scale) + shift
        x = tr.proj_out(x)
        return unpatchify(x, st.grid, self.patch_size, self.out_channels)

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
