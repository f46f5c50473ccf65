"""Wan2.1 / Wan2.2 video (``WanTransformer3DModel``): text-to-video (``WanPipeline``) and
image-to-video (``WanImageToVideoPipeline``), as the diffusers pipelines run them.

* Latents are 5-D ``[n, C, F', H', W']`` (F' = (num_frames - 1) / 4 + 1, H' = height / 8), kept in
  float32 as the pipelines keep them; the transformer sees them in its dtype. Its tokens are the
  3-D patches (1 x 2 x 2) in (frame, row, column) order, with Wan's 3-D RoPE (one rotary table per
  (F', H'/2, W'/2) grid, cached).
* Text: UMT5 states of the cleaned prompt (the pipeline's ``prompt_clean``), zeroed past the prompt
  and padded to ``max_sequence_length`` (512), as the pipeline pads; Wan attends to the padding
  (no caption mask), so every request's caption has the same 512 rows and any two requests of one
  latent size can share a forward. ``Cond.tokens`` keeps the raw UMT5 states and ``embed``
  projects them with the step's expert (Wan2.2's two experts have their own projections).
* Image-to-video (Wan2.1): the CLIP image encoder's penultimate states ride in ``Cond.pooled``
  (projected by the expert's image embedder, put in front of the text, as the model does), and
  the VAE-encoded first frame + the frame mask (20 channels) are the request's ``cond_latents``,
  concatenated to the latents' channels at every step. Checkpoints without an image encoder
  (Wan2.2 I2V) skip the CLIP part.
* Wan2.2's two experts (``transformer_2``, ``boundary_ratio`` in model_index.json): steps with
  ``t >= boundary_ratio * 1000`` run ``transformer``, later ones ``transformer_2``. The expert is
  part of a request's batch key (``DiTRequest.batch_key``), so one forward never mixes them, and of
  the state's ``grid`` ``(F', H', W', expert)``, so CUDA graphs never replay one expert's blocks for
  the other.
* Per-token timesteps ``t`` [B, 2] (Wan2.2 TI2V, ``wan_ti2v.py``): the first latent frame's tokens are
  modulated with the first timestep's projections, the others with the second's (``head_tokens``).
* TeaCache watches the timestep embedding, with TeaCache4Wan2.1's fits where published (``wan_teacache.py``).
* Scheduler: the checkpoint's own (UniPC with flow sigmas and shift, in the hub's Wan2.1 files),
  one per request. Decode: latents * std + mean, then ``AutoencoderKLWan`` (see
  ``omni_ray/dit/video_decode.py`` for the chunked decode the engine runs between steps).
"""

from __future__ import annotations

import copy
import html
import re

import torch

from omni_ray.dit.families.base import BlockState, Cond, DiTFamily
from omni_ray.dit.families.sdpa_choice import SdpaChoice
from omni_ray.dit.families.wan_block import DiffusersBlock, Kernels, WanBlock, per_segment, segments, supported
from omni_ray.errors import ConfigError, InvalidRequestError


def prompt_clean(text: str) -> str:
    """The Wan pipelines' ``prompt_clean``: ftfy (when installed, as there), html unescape, spaces."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _bad(param: str, msg: str):
    raise InvalidRequestError(msg, param=param)


class WanFamily(DiTFamily):
    pipeline_class = "WanPipeline"
    default_steps = 50
    default_guidance = 5.0
    default_max_sequence_length = 512
    default_num_frames = 81
    supports_caption_mask = False
    produces_video = True
    expand_timesteps = False         # Wan2.2 TI2V: per-token timesteps (wan_ti2v.py)

    def __init__(self, comps: dict, device, dtype, max_sequence_length):     # (not the base one: a 3-D VAE)
        self.device, self.dtype = device, dtype
        self.experts = [m for m in (comps.get("transformer"), comps.get("transformer_2")) if m is not None]
        if not self.experts:
            raise ConfigError("a Wan model needs transformer/ (and Wan2.2: transformer_2/)")
        if bool(comps.get("expand_timesteps")) != self.expand_timesteps:      # (family_class picks the class)
            raise ConfigError(f"{type(self).__name__} runs {'' if self.expand_timesteps else 'no '}checkpoints with "
                              "expand_timesteps (Wan2.2 TI2V): build the family with family_class()")
        self.transformer = self.experts[0]
        self.vae = comps["vae"]
        self.base_scheduler = comps["scheduler"]
        self.tokenizer, self.text_encoder = comps.get("tokenizer"), comps.get("text_encoder")
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        cfg, vcfg = self.transformer.config, self.vae.config
        ratio = comps.get("boundary_ratio")
        if ratio is not None and len(self.experts) < 2:
            raise ConfigError("model_index.json sets boundary_ratio but there is no transformer_2")
        if len(self.experts) > 1 and ratio is None:
            raise ConfigError("a Wan model with transformer_2 needs boundary_ratio in model_index.json")
        self.boundary_timestep = None if ratio is None else ratio * self.base_scheduler.config.num_train_timesteps
        self.vae_scale_factor = vcfg.scale_factor_spatial
        self.vae_scale_temporal = vcfg.scale_factor_temporal
        self.patch_size = tuple(cfg.patch_size)
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels or cfg.in_channels
        self.latent_channels = vcfg.z_dim
        self.kernels = Kernels()
        self.expert_fns = [[WanBlock(b, self.kernels) if supported(b) else DiffusersBlock(b) for b in e.blocks]
                           for e in self.experts]
        self.block_fns = self.expert_fns[0]
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sdpa = SdpaChoice(cfg.num_attention_heads, cfg.attention_head_dim, device, dtype)
        self._rope = self._rope_module()
        self.sp = None                       # the Ulysses group of a sequence-parallel rank (parallel/ulysses.py)
        mean = torch.tensor(vcfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        std = torch.tensor(vcfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_mean, self.latents_std = mean.to(device), std.to(device)
        from diffusers.video_processor import VideoProcessor
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)

    def _rope_module(self):
        """The transformer's RoPE tables in float32 or better (a bf16 load may have cast them)."""
        rope = self.transformer.rope
        if rope.freqs_cos.dtype in (torch.float32, torch.float64):
            return rope
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
        return WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len).to(self.device)

    def fuse_elementwise(self) -> None:
        self.kernels.fuse()

    def set_norm_kernels(self, on: bool) -> None:
        self.kernels.use_norm_kernels = on

    def set_attention_backend(self, name: str) -> None:
        self.sdpa.mode = name

    def lean_vae(self) -> None:
        """The decoder's RMS norm + SiLU kernel, channels-last convolutions (wan_vae.py), on a CUDA VAE."""
        if self.vae is not None and next(self.vae.parameters()).is_cuda:
            from omni_ray.dit.families.wan_vae import lean_decoder
            lean_decoder(self.vae)

    def compile(self) -> None:
        self.expert_fns = [[torch.compile(f, dynamic=True) for f in fns] for fns in self.expert_fns]
        self.block_fns = self.expert_fns[0]

    # ------------------------------------------------------------------ shape
    @property
    def stride(self) -> int:
        return self.vae_scale_factor * max(self.patch_size[1:])

    @property
    def default_hw(self) -> tuple[int, int]:
        return 480, 832

    @property
    def default_size(self) -> int:
        return 480

    @property
    def blocks(self):
        return self.transformer.blocks

    def num_latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_temporal + 1

    def check_num_frames(self, num_frames: int | None, cfg) -> int:
        n = self.default_num_frames if num_frames is None else num_frames
        k = self.vae_scale_temporal
        if (n - 1) % k:
            _bad("num_frames", f"num_frames must be {k}k + 1 (1, {k + 1}, {2 * k + 1}, ..., 81), got {n}")
        if n > cfg.max_frames:
            _bad("num_frames", f"num_frames must be at most {cfg.max_frames}, got {n}")
        if self.num_latent_frames(n) % self.patch_size[0]:
            _bad("num_frames", f"num_frames gives {self.num_latent_frames(n)} latent frames, not a multiple of "
                 f"the temporal patch {self.patch_size[0]}")
        return n

    def check_image(self, image) -> tuple[int, int]:
        _bad("image", "this is a text-to-video model: it takes no input image (use an image-to-video model)")

    def latent_shapes(self, r) -> tuple:
        """The request's (frames, rows, columns) patch grid: frames join the batching key, and a
        parallel step's header carries it."""
        pt, ph, pw = self.patch_size
        h, w = r.height // self.vae_scale_factor, r.width // self.vae_scale_factor
        return ((self.num_latent_frames(r.num_frames) // pt, h // ph, w // pw),)

    # ------------------------------------------------------------------ conditioning
    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None

    @property
    def caption_dim(self) -> int:
        return self.transformer.config.text_dim

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As WanPipeline._get_t5_prompt_embeds: UMT5 states zeroed past each prompt, padded to
        ``max_sequence_length``; mask = the tokenizer's."""
        if self.text_encoder is None:
            raise ConfigError("this Wan model has no text encoder")
        L = self.max_sequence_length
        enc = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=L, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        states = self.text_encoder(ids, mask).last_hidden_state
        states = states * mask.gt(0)[..., None].to(states.dtype)       # the pipeline's u[:len] + zeros
        return states.to(self.dtype), mask.long()

    @torch.no_grad()
    def project(self, embeds: torch.Tensor, mask: torch.Tensor) -> Cond:
        """Raw UMT5 states, zeroed where masked, padded with zero rows to ``max_sequence_length``
        (the expert projects them in ``embed``)."""
        L = self.max_sequence_length
        embeds = embeds.to(self.device, self.dtype) * mask.to(self.device)[:, None].gt(0).to(self.dtype)
        if embeds.shape[0] < L:
            embeds = torch.cat([embeds, embeds.new_zeros(L - embeds.shape[0], embeds.shape[1])])
        return Cond(tokens=embeds[:L])

    def batch_cond(self, conds: list[Cond]):
        img = [c.pooled for c in conds]
        pooled = torch.stack(img) if all(i is not None for i in img) else None
        return torch.stack([c.tokens for c in conds]), None, pooled

    # ------------------------------------------------------------------ sampling
    def new_scheduler(self, steps: int, height: int, width: int):
        sched = copy.deepcopy(self.base_scheduler)
        sched.set_timesteps(steps, device="cpu")
        sched.set_begin_index(0)
        return sched

    def prepare_request(self, r) -> None:
        from diffusers.utils.torch_utils import randn_tensor

        shape = (r.num_images, self.latent_channels, self.num_latent_frames(r.num_frames),
                 r.height // self.vae_scale_factor, r.width // self.vae_scale_factor)
        r.latents = randn_tensor(shape, generator=r.generator, device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------------ transformer
    def rope(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
        """For a (frames, rows, columns) token grid, float32: (cos, sin) [N, head_dim / 2] of each rotated
        pair (the lean block's), then diffusers' (cos, sin) [1, N, 1, head_dim]. Cached: CUDA graphs read
        the same tensors at every replay."""
        if grid not in self._rope_cache:
            pt, ph, pw = self.patch_size
            f, h, w = grid
            probe = torch.empty((1, 1, f * pt, h * ph, w * pw), device="meta")
            cos, sin = (t.to(self.device, torch.float32) for t in self._rope(probe))
            self._rope_cache[grid] = (cos[0, :, 0, 0::2].contiguous(), sin[0, :, 0, 1::2].contiguous(), cos, sin)
        return self._rope_cache[grid]

    def expert_index(self, t: torch.Tensor) -> int:
        """Which expert runs a batch at timesteps ``t`` (all rows are on one side of the boundary)."""
        if self.boundary_timestep is None:
            return 0
        return 0 if float(t[0]) >= self.boundary_timestep else 1

    def embed(self, x, t, ctx, ctx_bias, pooled, shapes: tuple = ()) -> BlockState:
        e = self.expert_index(t)
        tr = self.experts[e]
        pt, ph, pw = self.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        tokens = tr.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()     # [B, N, D]
        self.sdpa.prepare(tokens.shape[0], tokens.shape[1])      # measured once per token count (CUDA, auto)
        # t [B], or per-token timesteps [B, S] (one per token segment, head_tokens): temb [B, (S,) D]
        seq = t.shape[1] if t.dim() == 2 else None
        temb, tproj, ctx, img = tr.condition_embedder(t.flatten(), ctx.to(self.dtype), pooled, timestep_seq_len=seq)
        if img is not None:
            ctx = torch.cat([img, ctx], dim=1)                   # image states in front of the text
        return BlockState(x=tokens, ctx=ctx, ctx_bias=None, temb=tproj.unflatten(-1, (6, -1)), emb=temb,
                          grid=(*grid, e), shapes=shapes)

    def head_tokens(self, st: BlockState) -> int:
        """Per-token timesteps [B, 2] (Wan2.2 TI2V): the first latent frame's tokens take the first, the
        others the second; how many of this state's tokens (a shard under sequence parallel) are the first
        frame's. 0 for one timestep per row."""
        if st.temb.dim() != 4:
            return 0
        f, h, w = st.grid[:3]
        lo = sum(self.sp.counts[:self.sp.index]) if self.sp is not None and self.sp.active else 0
        return max(0, min(h * w - lo, st.x.shape[1]))

    def run_block(self, i: int, st: BlockState) -> None:
        f, h, w, e = st.grid
        rope = self.rope((f, h, w))
        if self.sp is not None and self.sp.active:           # sequence parallel: this rank's token rows
            lo, n = sum(self.sp.counts[:self.sp.index]), self.sp.counts[self.sp.index]
            rope = (rope[0][lo:lo + n], rope[1][lo:lo + n], *rope[2:])
        with self.sdpa.context(f * h * w):                   # self-attention runs over all f*h*w tokens
            st.x = self.expert_fns[e][i](st.x, st.ctx, st.temb, rope, self.head_tokens(st))

    def modulated_input(self, st: BlockState) -> torch.Tensor:
        b = self.experts[st.grid[3]].blocks[0]

        def mod(x, temb):
            shift, scale = (b.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
            return (b.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        return segments(st.x, self.head_tokens(st), per_segment(st.temb, 3), mod)

    def teacache_signal(self, st: BlockState) -> torch.Tensor:
        """The timestep embedding [B, D] (the other frames' under per-token timesteps): what TeaCache's Wan
        polynomials were fitted on (wan_teacache.py)."""
        return st.emb[:, -1] if st.emb.dim() == 3 else st.emb

    def teacache_polynomial(self, r) -> tuple | None:
        from omni_ray.dit.families.wan_teacache import wan_polynomial
        return wan_polynomial(self.transformer.config, len(self.experts), r.height, r.width)

    def final(self, st: BlockState) -> torch.Tensor:
        return self.assemble(self.final_tokens(st), st.grid)                              # [B, C, F', H', W']

    def final_tokens(self, st: BlockState) -> torch.Tensor:
        """The output norm and projection, token-wise: [B, n, D] -> [B, n, pt*ph*pw*C] (a token shard
        under sequence parallel)."""
        tr = self.experts[st.grid[3]]

        def out(x, emb):
            shift, scale = (tr.scale_shift_table + emb.unsqueeze(1)).chunk(2, dim=1)
            return tr.proj_out((tr.norm_out(x.float()) * (1 + scale) + shift).type_as(x))
        return segments(st.x, self.head_tokens(st), per_segment(st.emb, 2), out)

    def assemble(self, tokens: torch.Tensor, grid: tuple) -> torch.Tensor:
        """Every token's ``final_tokens`` [B, f*h*w, pt*ph*pw*C] -> the prediction [B, C, F', H', W']."""
        f, h, w = grid[:3]
        pt, ph, pw = self.patch_size
        x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    # ------------------------------------------------------------------ VAE
    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Scheduler latents -> the VAE's (as the pipeline: ``latents / (1 / std) + mean``)."""
        latents = latents.to(self.vae.dtype)
        return latents / (1.0 / self.latents_std.to(latents.dtype)) + self.latents_mean.to(latents.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, F', h, w] -> videos [B, 3, F, H, W] in [-1, 1] (in one call)."""
        return self.vae.decode(self.denormalize(latents), return_dict=False)[0]


class WanI2VFamily(WanFamily):
    """Image-to-video: the first frame conditions every step (see the module docstring)."""

    pipeline_class = "WanImageToVideoPipeline"
    extra_components = frozenset({"image_encoder"})
    accepts_image = True

    def __init__(self, comps: dict, device, dtype, max_sequence_length):
        super().__init__(comps, device, dtype, max_sequence_length)
        self.image_encoder, self.image_processor = comps.get("image_encoder"), comps.get("image_processor")
        if self.transformer.config.image_dim is not None and not comps.get("_denoiser_only") and (
                self.image_encoder is None or self.image_processor is None):   # (a parallel worker rank: no CLIP)
            raise ConfigError("this Wan I2V transformer takes CLIP image states: the model needs image_encoder/ "
                              "and image_processor/")
        if self.transformer.config.image_dim is not None and self.max_sequence_length != 512:
            raise ConfigError("Wan I2V splits image from text states at 512 text tokens: "
                              "max_sequence_length must be 512")

    def check_image(self, image) -> tuple[int, int]:
        from PIL import Image

        if not isinstance(image, Image.Image):
            _bad("image", f"image must be a PIL.Image, got {type(image).__name__}")
        return self.default_hw

    @torch.no_grad()
    def clip_states(self, image) -> torch.Tensor | None:
        """CLIP's penultimate hidden states [T_img, image_dim] (None: the model takes none)."""
        if self.transformer.config.image_dim is None:
            return None
        px = self.image_processor(images=image, return_tensors="pt").to(self.device)
        states = self.image_encoder(**px, output_hidden_states=True).hidden_states[-2]
        return states[0].to(self.dtype)

    @torch.no_grad()
    def prepare_request(self, r) -> None:
        from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents

        super().prepare_request(r)                                   # the noise first, as the pipeline
        n, _, F, h, w = r.latents.shape
        image = self.video_processor.preprocess(r.image.convert("RGB"), height=r.height, width=r.width)
        image = image.to(self.device, torch.float32).unsqueeze(2)                          # [1, 3, 1, H, W]
        video = torch.cat([image, image.new_zeros(1, 3, r.num_frames - 1, r.height, r.width)], dim=2)
        lat = retrieve_latents(self.vae.encode(video.to(self.vae.dtype)), sample_mode="argmax")
        lat = (lat.to(torch.float32) - self.latents_mean) * (1.0 / self.latents_std)
        k = self.vae_scale_temporal
        mask = torch.zeros(1, 1, r.num_frames, h, w, device=self.device)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(k, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(1, -1, k, h, w).transpose(1, 2)                                    # [1, k, F', h, w]
        r.cond_latents = torch.cat([mask, lat], dim=1).repeat(n, 1, 1, 1, 1)               # [n, k + C, F', h, w]
        states = self.clip_states(r.image)
        r.cond = Cond(tokens=r.cond.tokens, pooled=states)
        if r.neg_cond is not None:
            r.neg_cond = Cond(tokens=r.neg_cond.tokens, pooled=states)
