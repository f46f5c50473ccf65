"""The adapter interface one DiT family implements, and what the engine hands between its parts.

An adapter owns the family's components (transformer, VAE, scheduler, text encoders) and splits
the transformer's forward into pieces the engine drives: ``embed`` (patch embed, timestep and
caption conditioning), ``run_block(i)`` for each block, ``final`` (output norm, projection,
unpatchify). The engine runs the blocks itself so that the step cache can skip them per sample.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch
from torch import nn

from omni_ray.dit.caption_pack import PACK_MULTIPLE


@dataclass
class Cond:
    """One prompt's conditioning, projected once per request (not once per step)."""

    tokens: torch.Tensor                 # [T, D] caption tokens in the transformer's width
    mask: torch.Tensor | None = None     # [T] 1 = attend, 0 = padding (families with caption masks)
    pooled: torch.Tensor | None = None   # [D] pooled text embedding (SD3)


@dataclass
class BlockState:
    """The transformer's running state for a batch of rows (a row = one CFG half of one image)."""

    x: torch.Tensor                      # [B, N, D] image tokens
    ctx: torch.Tensor                    # [B, T, D] caption tokens
    ctx_bias: torch.Tensor | None        # [B, 1, T] additive caption mask (0 keep, -10000 drop) or None
    temb: torch.Tensor                   # [B, *] the blocks' timestep conditioning
    emb: torch.Tensor                    # [B, *] the final layer's conditioning
    grid: tuple[int, int]                # (h, w) in patches
    shapes: tuple = ()                   # the batch's hashable geometry, shared by its rows (Qwen-Image: the
                                         # (frame, h, w) patch grids of the noise and any condition image)
    text_lens: tuple[int, ...] | None = None   # real caption tokens per row, where the family packs its caption
                                               # stream's GEMMs (omni_ray/dit/caption_pack.py)
    text_pack: torch.Tensor | None = None      # that pack, made for a CUDA graph's padded rows and captions
    caption_holes: bool = False                # a caption mask that is not each row's real tokens then padding
                                               # (no ragged attention: omni_ray/dit/families/ragged_attention.py)

    def select(self, idx: torch.Tensor, rows: list[int] | None = None) -> "BlockState":
        """The rows ``idx`` (a LongTensor on the state's device; ``rows``: the same on the host, for the
        caption lengths), as a new state."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.index_select(0, idx) if isinstance(v, torch.Tensor) else v
        kw["text_pack"] = None
        kw["text_lens"] = None if self.text_lens is None or rows is None else tuple(self.text_lens[r] for r in rows)
        return BlockState(**kw)


def unpatchify(x: torch.Tensor, grid: tuple[int, int], p: int, c: int) -> torch.Tensor:
    """[B, h*w, p*p*c] -> [B, c, h*p, w*p] (diffusers' order: n h w p q c -> n c h p w q)."""
    h, w = grid
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)


class DiTFamily(ABC):
    """One model family. Subclasses set the class attributes and implement the abstract methods."""

    pipeline_class: str = ""             # model_index.json's _class_name
    default_steps: int = 20
    default_guidance: float = 4.5
    default_max_sequence_length: int = 300
    supports_caption_mask: bool = True   # can pad captions of different lengths inside one batch
    skip_components: frozenset = frozenset()  # model_index.json components the DiT replica never loads
    text_encoder_note: str = ""          # appended to the error of a prompt-only request (no text encoder)
    teacache_coefficients: tuple | None = None   # TeaCache's rescaling polynomial (numpy order); None: identity
    accepts_image: bool = False          # takes a per-request input image (edit models)
    produces_video: bool = False         # outputs are frame arrays, decoded chunk by chunk (video_decode.py)
    produces_audio: bool = False         # speech: requests carry codec tokens (speech.py), outputs are waveforms
    extra_components: frozenset = frozenset()   # components the loader skips unless asked (image_encoder)

    def __init__(self, comps: dict, device: torch.device, dtype: torch.dtype, max_sequence_length: int | None):
        self.device, self.dtype = device, dtype
        self.transformer: nn.Module = comps["transformer"]
        self.vae: nn.Module = comps["vae"]
        self.base_scheduler = comps["scheduler"]
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.vae_scale_factor = self._vae_scale_factor()
        self.patch_size = self.transformer.config.patch_size
        self.in_channels = self.transformer.config.in_channels
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.block_fns: list = list(self.transformer.transformer_blocks)   # what run_block calls

    def _vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def set_attention_backend(self, name: str) -> None:
        """Which SDPA kernel the blocks use (``DiTEngineConfig.attention_backend``; families that measure)."""

    def fuse_elementwise(self) -> None:
        """Compile the family's small elementwise helpers into fused kernels (if it has any)."""

    def lean_vae(self) -> None:
        """The VAE's faster modules on CUDA (``DiTEngineConfig.vae_lean_decoder``; families that have them)."""

    def set_norm_kernels(self, on: bool) -> None:
        """The blocks' norms as hand-written kernels when fused (``DiTEngineConfig.norm_kernels``; families that
        have them)."""

    pack_multiple = PACK_MULTIPLE           # caption packing: packed caption rows are a multiple of this

    def set_caption_packing(self, on: bool) -> None:
        """The caption stream's GEMMs over real caption tokens only (``DiTEngineConfig.caption_packing``;
        MMDiT families that pad captions)."""

    def compile(self) -> None:
        """torch.compile each block's forward (dynamic batch size); the modules stay untouched,
        so a diffusers pipeline sharing them keeps running eagerly."""
        self.block_fns = [torch.compile(f, dynamic=True) for f in self.block_fns]

    # ------------------------------------------------------------------ shape
    @property
    def stride(self) -> int:
        """Image sizes must be multiples of this (VAE scale x patch size)."""
        return self.vae_scale_factor * self.patch_size

    @property
    def default_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def default_hw(self) -> tuple[int, int]:
        """(height, width) of a request that names neither."""
        return self.default_size, self.default_size

    boundary_timestep: float | None = None   # two-expert models: the timestep where the second one takes over

    def check_num_frames(self, num_frames: int | None, cfg) -> int:
        """A request's frame count after the family's checks (InvalidRequestError naming the field).
        Image models: one frame."""
        from omni_ray.errors import InvalidRequestError

        if num_frames not in (None, 1):
            raise InvalidRequestError("num_frames: this model generates images, not videos", param="num_frames")
        return 1

    def prepare_request(self, r) -> None:
        """Admission (on the engine's device thread): an input image's ``cond_latents``, then the
        request's initial latents (video families override it: 5-D latents, their own conditioning)."""
        if r.image is not None:
            r.cond_latents = self.encode_image(r.image, r.num_images)
        r.latents = self.prepare_latents(r.num_images, r.height, r.width, r.generator, r.scheduler)

    @property
    def max_size(self) -> int | None:
        """The largest height / width in pixels the transformer can embed (None: no limit)."""
        return None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    # ------------------------------------------------------------------ conditioning
    @property
    @abstractmethod
    def has_text_encoder(self) -> bool: ...

    @property
    @abstractmethod
    def caption_dim(self) -> int:
        """Width of a ``prompt_embeds`` row this model accepts."""

    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text -> (embeds [B, T, caption_dim], mask [B, T] of 0/1), on the device."""

    @property
    def max_embed_tokens(self) -> int:
        """The most rows a request's ``prompt_embeds`` may have."""
        return self.max_sequence_length

    def check_embeds(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Family-specific checks of a request's ``prompt_embeds`` (raise InvalidRequestError)."""

    def null_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional caption of a model without a text encoder: one zero token."""
        return (torch.zeros(1, self.caption_dim, device=self.device, dtype=self.dtype),
                torch.ones(1, dtype=torch.long, device=self.device))

    @abstractmethod
    def project(self, embeds: torch.Tensor, mask: torch.Tensor) -> Cond:
        """One prompt's embeds [T, caption_dim] + mask [T] -> its step-independent conditioning."""

    @abstractmethod
    def batch_cond(self, conds: list[Cond]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Rows' conditionings -> (ctx [B, T, D], ctx_bias [B, 1, T] or None, pooled [B, D] or None)."""

    # ------------------------------------------------------------------ sampling
    def new_scheduler(self, steps: int, height: int, width: int):
        """A fresh scheduler of the model's kind with its timesteps set (timesteps stay on the CPU:
        the per-step scheduler arithmetic then never syncs with the GPU)."""
        sched = copy.deepcopy(self.base_scheduler)
        sched.set_timesteps(steps, device="cpu", **self.timestep_kwargs(height, width))
        return sched

    def timestep_kwargs(self, height: int, width: int) -> dict:
        return {}

    def prepare_latents(self, n: int, height: int, width: int, generator: torch.Generator,
                        scheduler) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        shape = (n, self.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def step_kwargs(self, generator: torch.Generator) -> dict:
        return {}

    def cfg_enabled(self, guidance_scale: float, has_negative: bool) -> bool:
        """Whether a request runs classifier-free guidance (a doubled batch)."""
        return guidance_scale > 1.0

    def combine_cfg(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided prediction from the two halves."""
        return uncond + scale * (cond - uncond)

    def latent_shapes(self, req) -> tuple:
        """A request's hashable geometry (``BlockState.shapes``), at admission; requests sharing a
        forward have equal ones."""
        return ()

    def batch_key(self, r) -> tuple:
        """Requests with equal keys share a forward (set at admission): the latent size, the caption
        length for families without caption masks, the ``latent_shapes``."""
        caption = () if self.supports_caption_mask else (r.cond.tokens.shape[0],)
        return (r.height // self.vae_scale_factor, r.width // self.vae_scale_factor, *caption, *r.shapes)

    def stack_latents(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """The batch's latents, request after request (families that pad rows of different lengths override)."""
        return torch.cat(xs)

    def request_output(self, out: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """A request's rows of the batch's prediction -> what its scheduler steps (drops padding)."""
        return out

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The engine's latents -> what ``decode`` takes (families with packed latents unpack here)."""
        return latents

    # ------------------------------------------------------------------ input images (edit models)
    def check_image(self, image) -> tuple[int, int]:
        """Validate a request's input image; returns the default (height, width) of the output."""
        from omni_ray.errors import InvalidRequestError
        raise InvalidRequestError("this model takes no input image", param="image")

    def encode_image(self, image, n: int) -> torch.Tensor:
        """An input image -> the condition tokens [n, M, C] appended after the noise tokens."""
        raise NotImplementedError

    def model_output(self, pred: torch.Tensor) -> torch.Tensor:
        """The part of the transformer's output the scheduler takes (drops a learned variance)."""
        return pred

    def model_input(self, r, latents: torch.Tensor) -> torch.Tensor:
        """A request's (scaled) latents -> its rows of the transformer's input: an input image's
        ``cond_latents`` joined after them on dim 1 (an edit's tokens; Wan I2V's channels)."""
        return latents if r.cond_latents is None else torch.cat([latents, r.cond_latents], dim=1)

    def row_timestep(self, r, t) -> float | tuple[float, ...]:
        """A request's rows' timestep at step ``t``: one float, or per-token timesteps as one float per
        token segment (the family defines the segments; Wan2.2 TI2V: the first latent frame, the rest).
        A batch where some rows give segments gives ``embed`` timesteps [B, S], a plain row's repeated."""
        return float(t)

    def final_latents(self, r) -> torch.Tensor:
        """A request's latents after its last step (Wan2.2 TI2V image-to-video: the first frame's put back)."""
        return r.latents

    # ------------------------------------------------------------------ transformer
    @abstractmethod
    def embed(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, ctx_bias: torch.Tensor | None,
              pooled: torch.Tensor | None, shapes: tuple = ()) -> BlockState:
        """Latents [B, C, H, W] + timesteps [B] + batched conditioning (+ the batch's ``latent_shapes``)
        -> the state before block 0."""

    @abstractmethod
    def run_block(self, i: int, st: BlockState) -> None:
        """Run block ``i`` on ``st`` in place."""

    @abstractmethod
    def modulated_input(self, st: BlockState) -> torch.Tensor:
        """Block 0's timestep-modulated input [B, N, D] (what TeaCache watches by default)."""

    def teacache_signal(self, st: BlockState) -> torch.Tensor:
        """What TeaCache compares step to step, one leading row per transformer row: the quantity the
        family's polynomial was fitted on (TeaCache's default: block 0's modulated input)."""
        return self.modulated_input(st)

    def teacache_polynomial(self, r) -> tuple | None:
        """The rescaling polynomial for request ``r`` (families whose fits depend on the resolution override)."""
        return self.teacache_coefficients

    @abstractmethod
    def final(self, st: BlockState) -> torch.Tensor:
        """State after the last block -> prediction [B, C_out, H, W]."""

    def final_tokens(self, st: BlockState) -> torch.Tensor:
        """The final layer on a token shard (sequence parallel): [B, n, D] -> [B, n, p*p*c_out].

        ``final`` is token-wise up to its unpatchify; run it on a 1 x n grid and undo that reshape
        (a pure permutation, so the values are the final layer's own)."""
        B, n = st.x.shape[:2]
        p, c = self.patch_size, self.out_channels
        img = self.final(BlockState(st.x, st.ctx, st.ctx_bias, st.temb, st.emb, (1, n), st.shapes))
        return torch.einsum("nchpwq->nhwpqc", img.reshape(B, c, 1, p, n, p)).reshape(B, n, p * p * c)

    def assemble(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Gathered ``final_tokens`` of every shard [B, N, p*p*c_out] -> the prediction ``final`` gives."""
        return unpatchify(tokens, grid, self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx, ctx_bias, pooled, shapes: tuple = ()) -> torch.Tensor:
        """The whole transformer over our pieces (equals the diffusers module's forward)."""
        st = self.embed(x, t, ctx, ctx_bias, pooled, shapes)
        for i in range(len(self.blocks)):
            self.run_block(i, st)
        return self.final(st)

    # ------------------------------------------------------------------ VAE
    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1]."""
