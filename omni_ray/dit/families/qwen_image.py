"""Qwen-Image and Qwen-Image-Edit (``QwenImageTransformer2DModel``): a dual-stream MMDiT (joint
text-image attention, 3D RoPE over frame / height / width, timestep modulation of both streams),
the 3D-causal ``AutoencoderKLQwenImage`` and the flow-matching Euler scheduler with the pipeline's
resolution-dependent shift.

The text encoder (Qwen2.5-VL) is not loaded here: it runs as an AR stage, and requests bring its
last hidden states as ``prompt_embeds`` [T, joint_attention_dim] (+ ``prompt_mask``), exactly as
``QwenImagePipeline.encode_prompt`` builds them (template prefix dropped). True CFG runs only with a
negative (``negative_prompt_embeds``) and ``guidance_scale`` (the pipeline's ``true_cfg_scale``) > 1,
and rescales the guided prediction to the conditional one's norm, as the pipeline does.

Latents are packed as the pipeline packs them: ``[n, (h/2)(w/2), 4C]`` (2x2 latent patches). Edit
appends the input image's packed VAE latents after the noise tokens in every forward; only the noise
tokens' prediction reaches the scheduler.
"""

from __future__ import annotations

import copy
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from omni_ray.dit.caption_pack import cached_positions
from omni_ray.dit.families.base import BlockState, Cond, DiTFamily
from omni_ray.dit.families.qwen_image_block import Kernels, QwenImageBlock, supported
from omni_ray.dit.families.ragged_attention import ragged_caption_attention
from omni_ray.dit.families.sdpa_choice import SdpaChoice
from omni_ray.dit.families.split_attention import split_caption_attention
from omni_ray.errors import ConfigError, InvalidRequestError

MASKED = -10000.0             # additive bias of a padded caption token (exp underflows to exactly 0)
EDIT_AREA = 1024 * 1024       # the edit pipeline resizes its input image to about this many pixels
MAX_INPUT_PIXELS = 8192 * 8192


def _pipeline():
    from diffusers import QwenImagePipeline
    return QwenImagePipeline


def edit_image_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) the edit pipeline resizes an input image to: about 1024 x 1024 pixels at its
    aspect ratio, multiples of 32 (``calculate_dimensions``). The AR stage's prompt image is this size too."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    w, h, _ = calculate_dimensions(EDIT_AREA, width / height)
    return int(w), int(h)


class QwenImageFamily(DiTFamily):
    pipeline_class = "QwenImagePipeline"
    default_steps = 50                      # the pipeline's num_inference_steps
    default_guidance = 4.0                  # the pipeline's true_cfg_scale
    default_max_sequence_length = 512       # the pipeline truncates prompt_embeds to max_sequence_length
    supports_caption_mask = True
    skip_components = frozenset({"text_encoder", "tokenizer", "processor"})
    text_encoder_note = ("its Qwen2.5-VL text encoder runs as an AR stage: use OmniLLM or the Serve pipeline, "
                         "which pass that stage's hidden states")
    # TeaCache's rescaling polynomial for Qwen-Image, from vllm-omni's vllm_omni/diffusion/cache/teacache/
    # config.py ("Qwen-Image transformer coefficients from ComfyUI-TeaCache"), highest power first
    teacache_coefficients = (-4.5e2, 2.8e2, -4.5e1, 3.2, -2.0e-2)
    max_text_tokens = 1024                  # the pipeline's tokenizer_max_length
    truncate = True                         # text-to-image truncates to max_sequence_length (edit does not)

    def __init__(self, comps: dict, device, dtype, max_sequence_length):
        super().__init__(comps, device, dtype, max_sequence_length)
        cfg = self.transformer.config
        if cfg.get("guidance_embeds", False):
            raise ConfigError("Qwen-Image with guidance_embeds (a guidance-distilled variant) is not supported")
        for flag in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if cfg.get(flag, False):
                raise ConfigError(f"Qwen-Image transformer with {flag}=true is not supported")
        if not self.transformer.pos_embed.scale_rope:
            raise ConfigError("Qwen-Image adapter expects the transformer's RoPE with scale_rope")
        self.out_channels = self.transformer.out_channels
        self.latent_channels = cfg.in_channels // (self.patch_size * self.patch_size)
        if not all(supported(b) for b in self.blocks):
            raise ConfigError("Qwen-Image adapter: a transformer block of an unexpected layout")
        self.kernels = Kernels()
        self.block_fns = [QwenImageBlock(b, self.kernels) for b in self.blocks]
        self.sdpa = SdpaChoice(cfg.num_attention_heads, cfg.attention_head_dim, device, dtype,
                               split=self._split_attention, ragged=ragged_caption_attention)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None        # RoPE cos / sin per position
        self._vid_freqs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.sp = None                      # the Ulysses group of a sequence-parallel rank
        self.caption_packing = False        # DiTEngineConfig.caption_packing
        # id of a batch's caption mask -> (a weak ref to it, its rows' lengths, whether each row is its real tokens
        # then padding: no hole, so the ragged attention may run)
        self._masks: dict[int, tuple] = {}
        self._packs: dict[tuple, torch.Tensor | None] = {}  # (lengths, T) -> the eager path's pack

    def _vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    # ------------------------------------------------------------------ shape
    @property
    def default_size(self) -> int:
        return 128 * self.vae_scale_factor            # the pipeline's default_sample_size

    # ------------------------------------------------------------------ conditioning
    @property
    def has_text_encoder(self) -> bool:
        return False

    @property
    def caption_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    def encode_prompt(self, prompts: list[str]):
        raise InvalidRequestError(f"this model has no text encoder in the DiT engine ({self.text_encoder_note})",
                                  param="prompt")

    @property
    def max_embed_tokens(self) -> int:
        return self.max_text_tokens

    @torch.no_grad()
    def project(self, embeds: torch.Tensor, mask: torch.Tensor) -> Cond:
        if self.truncate:
            embeds, mask = embeds[:self.max_sequence_length], mask[:self.max_sequence_length]
        tr = self.transformer
        tokens = tr.txt_in(tr.txt_norm(embeds.to(self.device, self.dtype)[None]))[0]     # [T, D]
        return Cond(tokens=tokens, mask=mask.to(self.device))

    def batch_cond(self, conds: list[Cond]):
        """Captions padded to the longest; a mask only when they differ (SDPA leaves its flash path
        under a mask), as the pipeline passes none for a caption without padding."""
        lens = [c.tokens.shape[0] for c in conds]
        t_max = max(lens)
        ctx = torch.stack([F.pad(c.tokens, (0, 0, 0, t_max - n)) for c, n in zip(conds, lens)])
        if all(n == t_max for n in lens) and all(bool(c.mask.all()) for c in conds):
            return ctx, None, None
        mask = torch.stack([F.pad(c.mask, (0, t_max - n)) for c, n in zip(conds, lens)])
        bias = ((1 - mask.to(self.dtype)) * MASKED).unsqueeze(1)                          # [B, 1, T]
        self._masks = {k: v for k, v in self._masks.items() if v[0]() is not None}     # kept on the host
        self._masks[id(bias)] = (weakref.ref(bias), tuple(lens), not bool((mask[:, 1:] > mask[:, :-1]).any()))
        return ctx, bias, None

    # ------------------------------------------------------------------ sampling
    def new_scheduler(self, steps: int, height: int, width: int):
        """The pipeline's schedule: sigmas linspace(1, 1/steps, steps), shifted by mu of the packed
        image sequence length (the scheduler config's values, the pipeline's defaults)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
        cfg = self.base_scheduler.config
        seq = (height // self.stride) * (width // self.stride)
        mu = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sched = copy.deepcopy(self.base_scheduler)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device="cpu", mu=mu)
        return sched

    def prepare_latents(self, n, height, width, generator, scheduler):
        from diffusers.utils.torch_utils import randn_tensor
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        noise = randn_tensor((n, 1, self.latent_channels, h, w), generator=generator, device=self.device,
                             dtype=self.dtype)
        return _pipeline()._pack_latents(noise, n, self.latent_channels, h, w)           # [n, h*w/4, 4C]

    def cfg_enabled(self, guidance_scale: float, has_negative: bool) -> bool:
        return guidance_scale > 1.0 and has_negative            # the pipeline's do_true_cfg

    def combine_cfg(self, uncond, cond, scale):
        comb = uncond + scale * (cond - uncond)
        return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def latent_shapes(self, req) -> tuple:
        s = self.stride
        return ((1, req.height // s, req.width // s),)

    def unpack_latents(self, latents, height, width):
        return _pipeline()._unpack_latents(latents, height, width, self.vae_scale_factor)  # [n, C, 1, h, w]

    # ------------------------------------------------------------------ transformer
    def fuse_elementwise(self) -> None:
        self.kernels.fuse()

    def set_norm_kernels(self, on: bool) -> None:
        self.kernels.use_norm_kernels = on

    def set_caption_packing(self, on: bool) -> None:
        self.caption_packing = on

    def _lens(self, ctx: torch.Tensor, ctx_bias: torch.Tensor | None) -> tuple[int, ...] | None:
        """The rows' caption lengths where captions are packed (a batch whose captions differ, as
        ``batch_cond`` made it; a sequence-parallel rank's broadcast copy has none)."""
        if not self.caption_packing or ctx_bias is None or (self.sp is not None and self.sp.active):
            return None
        ref, lens, _ = self._masks.get(id(ctx_bias), (None, None, None))
        return lens if ref is not None and ref() is ctx_bias and len(lens) == ctx.shape[0] else None

    def _pack(self, st: BlockState) -> torch.Tensor | None:
        if st.text_pack is not None:
            return st.text_pack
        if st.text_lens is None:
            return None
        key = (st.text_lens, st.ctx.shape[1])
        if key not in self._packs:
            if len(self._packs) >= 64:              # batches' caption lengths change as requests come and go
                self._packs.clear()
            pos = cached_positions(st.text_lens, st.ctx.shape[1], len(st.text_lens), self.pack_multiple)
            self._packs[key] = None if pos is None else torch.tensor(pos, dtype=torch.long, device=self.device)
        return self._packs[key]

    def _rope(self, shapes: tuple, text_len: int) -> tuple[torch.Tensor, ...]:
        """(image cos, image sin [N, d/2], text cos, text sin [T, d/2]) of a batch geometry, fp32, as the
        module's ``pos_embed`` gives them (complex): the image grids' frequencies, the text's from
        position max(h/2, w/2) on. Cached, so that CUDA graphs read the same tensors at every replay
        (the text's are views of one per-position table)."""
        key = (shapes, text_len)
        rope = self._rope_cache.get(key)
        if rope is None:
            pe = self.transformer.pos_embed
            if self._table is None:
                pos = pe.pos_freqs.to(self.device)
                self._table = (pos.real.contiguous(), pos.imag.contiguous())
            if shapes not in self._vid_freqs:
                vid = pe([list(shapes)], device=self.device, max_txt_seq_len=0)[0]
                self._vid_freqs[shapes] = (vid.real.contiguous(), vid.imag.contiguous())
            start = max(max(h // 2, w // 2) for _, h, w in shapes)
            if start + text_len > self._table[0].shape[0]:
                raise InvalidRequestError(f"{text_len} caption tokens do not fit the model's RoPE table at this "
                                          "size", param="prompt_embeds")
            cos, sin = self._table
            rope = self._rope_cache[key] = (*self._vid_freqs[shapes], cos[start:start + text_len],
                                            sin[start:start + text_len])
        return rope

    def embed(self, x, t, ctx, ctx_bias, pooled, shapes=()) -> BlockState:
        tr = self.transformer
        h = tr.img_in(x)                                                        # [B, N, D]
        for masked in {ctx_bias is not None, True}:     # (CUDA graphs pad captions to a bucket under a mask)
            self.sdpa.prepare(h.shape[0], ctx.shape[1] + h.shape[1], masked, prefix=ctx.shape[1])   # once per shape
        temb = tr.time_text_embed(t.to(h.dtype) / 1000, h)       # the pipeline passes t / 1000
        ref, _, prefix = self._masks.get(id(ctx_bias), (None, None, False))    # unknown: no ragged attention
        holes = ctx_bias is not None and not (prefix and ref() is ctx_bias)
        return BlockState(x=h, ctx=ctx, ctx_bias=ctx_bias, temb=temb, emb=temb, grid=tuple(shapes[0][1:]),
                          text_lens=self._lens(ctx, ctx_bias), shapes=shapes, caption_holes=holes)

    def run_block(self, i: int, st: BlockState) -> None:
        rope = self._rope(st.shapes, st.ctx.shape[1])
        if self.sp is not None and self.sp.active:       # sequence parallel: this rank's image rows
            lo = sum(self.sp.counts[:self.sp.index])
            n = self.sp.counts[self.sp.index]
            rope = (rope[0][lo:lo + n], rope[1][lo:lo + n], *rope[2:])
        # the joint [text | image] attention's kernel, as measured in embed (a sequence-parallel shard of the
        # image rows finds no measurement: torch's own order)
        tokens, masked = st.ctx.shape[1] + st.x.shape[1], st.ctx_bias is not None
        self.kernels.split = self.sdpa.splits(tokens, masked)    # the caption mask's split attention, if faster
        self.kernels.ragged = self.sdpa.runs("ragged", tokens, masked) and not st.caption_holes    # or ragged
        with self.sdpa.context(tokens, masked):
            st.x, st.ctx = self.block_fns[i](st.x, st.ctx, st.ctx_bias, st.temb, rope, self._pack(st))

    def _split_attention(self, q, k, v, text_bias, text_len):
        return split_caption_attention(q, k, v, text_bias, text_len, self.kernels.merge)

    def set_attention_backend(self, name: str) -> None:
        self.sdpa.mode = name

    def modulated_input(self, st: BlockState) -> torch.Tensor:
        blk = self.blocks[0]
        mod1 = blk.img_mod(st.temb).chunk(2, dim=-1)[0]
        return blk._modulate(blk.img_norm1(st.x), mod1)[0]

    def final(self, st: BlockState) -> torch.Tensor:
        """The noise tokens' prediction [B, h*w, 4C] (an edit's image tokens are dropped first: the
        final layer is token-wise)."""
        n = st.grid[0] * st.grid[1]
        return self.final_tokens(BlockState(st.x[:, :n], st.ctx, st.ctx_bias, st.temb, st.emb, st.grid, st.shapes))

    def final_tokens(self, st: BlockState) -> torch.Tensor:
        tr = self.transformer
        return tr.proj_out(tr.norm_out(st.x, st.emb))

    def assemble(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return tokens[:, :grid[0] * grid[1]]

    # ------------------------------------------------------------------ VAE
    def _latents_stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(cfg.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents [B, C, 1, h, w] -> images [B, 3, H, W] (the pipeline's de-normalisation)."""
        latents = latents.to(self.vae.dtype)
        mean, std = self._latents_stats(latents)
        latents = latents / (1.0 / std) + mean
        return self.vae.decode(latents, return_dict=False)[0][:, :, 0]


class QwenImageEditFamily(QwenImageFamily):
    """Qwen-Image-Edit: the input image, resized to about 1024 x 1024 at its aspect ratio, is VAE-encoded
    once per request (the latent distribution's mode, normalised, packed) and its tokens follow the noise
    tokens in every forward, with their own (frame, h, w) RoPE grid. The prompt embeds come from the VL
    encoder run on the prompt and the same resized image (the AR stage)."""

    pipeline_class = "QwenImageEditPipeline"
    accepts_image = True
    truncate = False                        # the edit pipeline keeps every prompt token (image tokens included)
    max_text_tokens = 3072                  # prompt + ~1300 image tokens of a 1 MP prompt image, with room

    def check_image(self, image) -> tuple[int, int]:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise InvalidRequestError(f"image must be a PIL image, got {type(image).__name__}", param="image")
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P"):
            raise InvalidRequestError(f"image mode {image.mode!r} is not supported (RGB, RGBA, L, LA, P)",
                                      param="image")
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise InvalidRequestError(f"image has {image.width}x{image.height} pixels; the limit is "
                                      f"{MAX_INPUT_PIXELS}", param="image")
        w, h = edit_image_size(image.width, image.height)
        if min(w, h) < 32:
            raise InvalidRequestError(f"image aspect ratio {image.width}:{image.height} is too extreme "
                                      "(it resizes to less than 32 pixels on a side)", param="image")
        m = self.stride
        return h // m * m, w // m * m                               # the pipeline's default output size

    @torch.no_grad()
    def encode_image(self, image, n: int) -> torch.Tensor:
        from diffusers.image_processor import VaeImageProcessor

        image = image if image.mode == "RGB" else image.convert("RGB")
        w, h = edit_image_size(image.width, image.height)
        proc = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)   # the pipeline's processor
        pixels = proc.preprocess(proc.resize(image, h, w), h, w).unsqueeze(2)  # [1, 3, 1, H, W] in [-1, 1]
        lat = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        mean, std = self._latents_stats(lat)
        lat = (lat - mean) / std                                               # [1, C, 1, h, w]
        lh, lw = lat.shape[-2:]
        packed = _pipeline()._pack_latents(lat, 1, self.latent_channels, lh, lw)
        return packed.expand(n, -1, -1).contiguous()

    def latent_shapes(self, req) -> tuple:
        shapes = super().latent_shapes(req)
        if req.image is None:
            return shapes
        w, h = edit_image_size(req.image.width, req.image.height)
        return (*shapes, (1, h // self.stride, w // self.stride))


__all__ = ["QwenImageEditFamily", "QwenImageFamily", "edit_image_size"]
