"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): an MMDiT with joint text-image attention,
two CLIP encoders + T5, a 16-channel VAE and the flow-matching Euler scheduler.

SD3 attends to every caption token (no mask), so requests only share a batch when their captions
have the same length. Its conditioning has a pooled CLIP vector besides the token sequence; in
``prompt_embeds`` it rides as row 0 (zero-padded to the token width):
``[1 + T, joint_attention_dim]`` = [pooled | CLIP tokens (77) | T5 tokens].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_ray.dit.families.base import BlockState, Cond, DiTFamily, unpatchify
from omni_ray.errors import ConfigError, InvalidRequestError


class SD3Family(DiTFamily):
    pipeline_class = "StableDiffusion3Pipeline"
    default_steps = 28
    default_guidance = 7.0
    default_max_sequence_length = 256       # T5 tokens (the CLIP part is always 77)
    supports_caption_mask = False

    def __init__(self, comps: dict, device, dtype, max_sequence_length):
        super().__init__(comps, device, dtype, max_sequence_length)
        cfg = self.transformer.config
        self.clip = [(comps.get("tokenizer"), comps.get("text_encoder")),
                     (comps.get("tokenizer_2"), comps.get("text_encoder_2"))]
        self.t5 = (comps.get("tokenizer_3"), comps.get("text_encoder_3"))
        if any(tok is None or enc is None for tok, enc in self.clip):
            raise ConfigError("an SD3 model needs text_encoder/tokenizer and text_encoder_2/tokenizer_2")
        if cfg.pooled_projection_dim > cfg.joint_attention_dim:
            raise ConfigError("SD3 adapter: pooled_projection_dim must not exceed joint_attention_dim")
        self.out_channels = self.transformer.out_channels
        self.pooled_dim = cfg.pooled_projection_dim

    # ------------------------------------------------------------------ conditioning
    @property
    def has_text_encoder(self) -> bool:
        return True

    @property
    def caption_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    @property
    def max_size(self) -> int:
        return self.transformer.config.pos_embed_max_size * self.stride

    def _clip_embeds(self, prompts, tokenizer, encoder):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds        # [B, 77, Hc], [B, Pc]

    def _t5_embeds(self, prompts):
        tokenizer, encoder = self.t5
        if encoder is None:
            return torch.zeros(len(prompts), self.max_sequence_length, self.caption_dim, device=self.device,
                               dtype=self.dtype)
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return encoder(ids)[0]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As StableDiffusion3Pipeline.encode_prompt (prompt_2 = prompt_3 = prompt, no clip skip)."""
        (h1, p1), (h2, p2) = (self._clip_embeds(prompts, tok, enc) for tok, enc in self.clip)
        clip = torch.cat([h1, h2], dim=-1)
        t5 = self._t5_embeds(prompts)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = F.pad(torch.cat([p1, p2], dim=-1), (0, t5.shape[-1] - self.pooled_dim))
        embeds = torch.cat([pooled[:, None], clip, t5], dim=1).to(self.dtype)   # [B, 1 + 77 + T5, D]
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)

    @property
    def max_embed_tokens(self) -> int:
        return 1 + self.clip[0][0].model_max_length + self.max_sequence_length    # pooled + CLIP + T5

    def check_embeds(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> None:
        if embeds.shape[0] < 2:
            raise InvalidRequestError("SD3 prompt_embeds need a pooled row plus at least one token: [1 + T, D]",
                                      param="prompt_embeds")
        if mask is not None and not bool(mask.bool().all()):
            raise InvalidRequestError("SD3 attends to every caption token: prompt_mask must be all ones",
                                      param="prompt_mask")

    def null_embeds(self):
        raise NotImplementedError  # SD3 always has its text encoders

    @torch.no_grad()
    def project(self, embeds: torch.Tensor, mask: torch.Tensor) -> Cond:
        tr = self.transformer
        embeds = embeds.to(self.device, self.dtype)
        pooled = tr.time_text_embed.text_embedder(embeds[:1, :self.pooled_dim])[0]   # [D]
        tokens = tr.context_embedder(embeds[1:][None])[0]                            # [T, D]
        return Cond(tokens=tokens, pooled=pooled)

    def batch_cond(self, conds: list[Cond]):
        return torch.stack([c.tokens for c in conds]), None, torch.stack([c.pooled for c in conds])

    # ------------------------------------------------------------------ sampling
    def timestep_kwargs(self, height: int, width: int) -> dict:
        cfg = self.base_scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
        seq = (height // self.stride) * (width // self.stride)
        return {"mu": calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))}

    # ------------------------------------------------------------------ transformer
    def _pos(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self._pos_cache:
            self._pos_cache[(h, w)] = self.transformer.pos_embed.cropped_pos_embed(h, w)
        return self._pos_cache[(h, w)]

    def embed(self, x, t, ctx, ctx_bias, pooled, shapes=()) -> BlockState:
        tr, p = self.transformer, self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        tokens = tr.pos_embed.proj(x).flatten(2).transpose(1, 2)                  # [B, N, D]
        tokens = (tokens + self._pos(x.shape[-2], x.shape[-1])).to(tokens.dtype).contiguous()
        tte = tr.time_text_embed
        temb = tte.timestep_embedder(tte.time_proj(t).to(dtype=pooled.dtype)) + pooled   # [B, D]
        return BlockState(x=tokens, ctx=ctx, ctx_bias=None, temb=temb, emb=temb, grid=grid)

    def run_block(self, i: int, st: BlockState) -> None:
        ctx, st.x = self.block_fns[i](hidden_states=st.x, encoder_hidden_states=st.ctx, temb=st.temb)
        if ctx is not None:          # the last block updates only the image stream
            st.ctx = ctx

    def modulated_input(self, st: BlockState) -> torch.Tensor:
        return self.blocks[0].norm1(st.x, emb=st.temb)[0]

    def final(self, st: BlockState) -> torch.Tensor:
        tr = self.transformer
        x = tr.proj_out(tr.norm_out(st.x, st.emb))
        return unpatchify(x, st.grid, self.patch_size, self.out_channels)

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        latents = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
