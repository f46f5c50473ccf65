"""One rank's share of a parallel transformer forward.

Every rank runs ``DiTRank.forward(meta)`` for every denoising step, in lockstep (the engine on rank
0 issues it through ``WorkerGroup.call``; ``meta`` holds only shapes and dtypes). Inside, the step's
tensors travel as collectives on the tensor group:

1. broadcast from rank 0: the caption rows (only when the batch's membership changed), the
   latents ``x [R, C, h, w]`` (video: ``[R, C, F', h, w]``) and timesteps ``t [R]``;
2. each rank embeds its row group's rows, keeps its token shard, runs every block (Ulysses
   all-to-alls inside self-attention when sequence parallel) and the final layer on its tokens;
3. all-gather of every rank's ``[rows, tokens, p*p*c]``; rank 0 reassembles and unpatchifies
   the prediction ``[R, C_out, H, W]``. The guided update and the schedulers stay on rank 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from omni_ray.config import DiTEngineConfig
from omni_ray.dit.families.base import BlockState, DiTFamily
from omni_ray.dit.parallel.layout import Layout, check_blocks
from omni_ray.dit.parallel.ulysses import SPGroup, install

log = logging.getLogger(__name__)

COND_KEYS = ("ctx", "bias", "pooled")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SLOT = 7                                  # ints per tensor in a step header: ndim, dtype, 5 dims (video)
_MAX_SHAPES = 4                            # (frame, h, w) triples of a batch's latent geometry


def spec(t: torch.Tensor | None):
    """What a receiving rank needs to allocate ``t``: (shape, dtype) or None."""
    return None if t is None else (tuple(t.shape), t.dtype)


def encode_meta(meta: dict) -> list[int]:
    """A step's meta (shapes and dtypes of x, t and, when re-sent, ctx/bias/pooled; the batch's
    latent geometry) as the ints of one ``WorkerGroup.post`` header:
    [cond sent] + 5 x [ndim or -1, dtype, 5 dims] + [number of geometry triples, triples...]."""
    cond = meta["cond"]
    specs = [meta["x"], meta["t"]] + [cond[k] if cond else None for k in COND_KEYS]
    out = [int(cond is not None)]
    for sp in specs:
        if sp is None:
            out += [-1] + [0] * (_SLOT - 1)
            continue
        shape, dtype = sp
        if len(shape) > _SLOT - 2:
            raise ValueError(f"cannot post a {len(shape)}-D tensor's shape")
        out += [len(shape), DTYPES.index(dtype), *shape] + [0] * (_SLOT - 2 - len(shape))
    shapes = meta.get("shapes", ())
    if len(shapes) > _MAX_SHAPES or any(len(s) != 3 for s in shapes):
        raise ValueError(f"cannot post the batch geometry {shapes!r}")
    flat = [int(v) for s in shapes for v in s]
    return out + [len(shapes)] + flat + [0] * (3 * _MAX_SHAPES - len(flat))


def decode_meta(values) -> dict:
    v = [int(i) for i in values]
    specs = []
    for j in range(5):
        ndim, dtype, *dims = v[1 + j * _SLOT:1 + (j + 1) * _SLOT]
        specs.append(None if ndim < 0 else (tuple(dims[:ndim]), DTYPES[dtype]))
    cond = dict(zip(COND_KEYS, specs[2:])) if v[0] else None
    g = 1 + 5 * _SLOT
    shapes = tuple(tuple(v[g + 1 + 3 * i:g + 4 + 3 * i]) for i in range(v[g]))
    return {"x": specs[0], "t": specs[1], "cond": cond, "shapes": shapes}


class DiTRank:
    def __init__(self, family: DiTFamily, layout: Layout, rank: int, group, sp_group=None, graphs=None):
        self.family, self.layout, self.rank, self.group = family, layout, rank, group
        self.device = family.device
        self.c, self.s = layout.cfg_index(rank), layout.sp_index(rank)
        self.sp: SPGroup | None = None
        if layout.sp > 1:
            self.sp = SPGroup(sp_group, layout.sp, self.s)
            install(family, self.sp)
        self.graphs = graphs if layout.sp == 1 else None     # collectives inside blocks: run eagerly
        self._staged: dict = {}
        self._cond: tuple | None = None                       # this rank's rows of (ctx, bias, pooled)
        self.steps = 0

    # ------------------------------------------------------------------ rank 0 only
    def stage(self, **tensors: torch.Tensor | None) -> None:
        """Rank 0: the tensors the next ``forward`` broadcasts (x, t, and ctx/bias/pooled)."""
        self._staged = tensors

    # ------------------------------------------------------------------ every rank
    def handle_post(self, values) -> torch.Tensor | None:
        """A step posted by rank 0 (``WorkerGroup.post``; rank 0 calls it itself)."""
        return self.forward(decode_meta(values))

    @torch.no_grad()
    def forward(self, meta: dict) -> torch.Tensor | None:
        """One transformer forward over the batch; the prediction on rank 0, None elsewhere."""
        rows = meta["x"][0][0]
        idx = self.layout.row_index(rows, self.c, self.device)
        if meta["cond"] is not None:
            cond = [self._broadcast(k, meta["cond"][k]) for k in COND_KEYS]
            self._cond = tuple(None if v is None else v.index_select(0, idx) for v in cond)
        x, t = self._broadcast("x", meta["x"]), self._broadcast("t", meta["t"])
        self._staged = {}
        st = self.family.embed(x.index_select(0, idx), t.index_select(0, idx), *self._cond, meta.get("shapes", ()))
        grid, tokens = st.grid, st.x.shape[1]
        counts = self._shard(st)
        self._blocks(st)
        out = self.family.final_tokens(st)                     # [r, n, p*p*c]
        self.steps += 1
        return self._gather(out, counts, rows, grid, tokens)

    def _broadcast(self, key: str, sp) -> torch.Tensor | None:
        if sp is None:
            return None
        if self.rank == 0:
            t = self._staged[key].contiguous()
        else:
            shape, dtype = sp
            t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(t, src=0, group=self.group)
        return t

    def _shard(self, st: BlockState) -> list[int]:
        """Keep this rank's token shard of ``st.x``; returns the tokens per shard (all tokens on
        shard 0 when there are fewer tokens than shards: then every rank runs them whole)."""
        L, N = self.layout, st.x.shape[1]
        if self.sp is None:
            return [N]
        if N < L.sp:
            self.sp.set_tokens(None)
            return [N] + [0] * (L.sp - 1)
        counts = L.token_counts(N)
        self.sp.set_tokens(counts)
        lo = sum(counts[:self.s])
        st.x = st.x[:, lo:lo + counts[self.s]].contiguous()
        return counts

    def _blocks(self, st: BlockState) -> None:
        n = len(self.family.blocks)
        if self.graphs is not None and self.graphs.run(st, 0, n):
            return
        for i in range(n):
            self.family.run_block(i, st)

    def _gather(self, out: torch.Tensor, counts: list[int], rows: int, grid, tokens: int) -> torch.Tensor | None:
        L = self.layout
        n_max = max(counts)
        if out.shape[1] < n_max:                                  # shards differ by a token: pad
            out = F.pad(out, (0, 0, 0, n_max - out.shape[1]))
        parts = [torch.empty_like(out) for _ in range(L.world)]
        dist.all_gather(parts, out.contiguous(), group=self.group)
        if self.rank != 0:
            return None
        groups = [torch.cat([parts[c * L.sp + s][:, :counts[s]] for s in range(L.sp)], dim=1)
                  for c in range(L.cfg)]
        pred = torch.cat(groups)[:rows]                          # [R, N, p*p*c]
        assert pred.shape[1] == tokens
        return self.family.assemble(pred, grid)


# ----------------------------------------------------------------------------- building ranks
# what a worker rank never loads: text / image encoders (rank 0 encodes every prompt and image)
WORKER_SKIP = {"PixArtSigmaPipeline": {"text_encoder", "tokenizer"},
               "StableDiffusion3Pipeline": {"text_encoder_3", "tokenizer_3"},
               "WanPipeline": {"text_encoder", "tokenizer"},
               "WanImageToVideoPipeline": {"text_encoder", "tokenizer", "image_encoder", "image_processor"}}


def load_worker_family(path: Path, device: torch.device, dtype: torch.dtype, cfg: DiTEngineConfig) -> DiTFamily:
    """The family a worker rank needs: the transformer(s) on its device, without the big text encoder
    (PixArt's T5, SD3's T5, Wan's UMT5) or Wan I2V's CLIP, and with the VAE on the CPU (only its config
    is read). Pipeline settings (Wan2.2's ``boundary_ratio``) pass through as the family reads them;
    ``_denoiser_only`` tells the family that the encoders are left out on purpose."""
    from omni_ray.dit.families import FAMILIES, family_class
    from omni_ray.dit.loader import load_component, read_model_index

    index = read_model_index(path)
    pipeline = index.get("_class_name", "")
    skip = WORKER_SKIP.get(pipeline, set()) | set(FAMILIES[pipeline].skip_components)
    comps: dict = {"_denoiser_only": True}
    for name, spec_ in index.items():
        if name.startswith("_") or name in ("feature_extractor", "safety_checker"):
            continue
        if not isinstance(spec_, list) or len(spec_) != 2:
            comps[name] = spec_                 # a pipeline setting (Wan2.2: boundary_ratio)
            continue
        library, cls_name = spec_
        if library is None or name in skip or name == "image_encoder":
            comps[name] = None
            continue
        dev = torch.device("cpu") if name == "vae" else device
        comps[name] = load_component(path, name, library, cls_name, dev, dtype, cfg.model.allow_pickle)
    return family_class(pipeline, index)(comps, device, dtype, cfg.max_sequence_length)


def prepare_family(fam: DiTFamily, cfg: DiTEngineConfig, layout: Layout):
    """The config's speed-ups on a loaded family; returns its CUDA graphs (None: run eagerly).
    Sequence-parallel blocks hold collectives, so they are never graph-captured."""
    cuda = fam.device.type == "cuda"
    fam.set_attention_backend(cfg.attention_backend)
    fam.set_caption_packing(cfg.caption_packing)
    fam.set_norm_kernels(cfg.norm_kernels)
    if cfg.fuse_elementwise and cuda:
        fam.fuse_elementwise()
    if cfg.compile:
        fam.compile()
    if cfg.vae_lean_decoder and cuda:
        fam.lean_vae()
    if fam.produces_audio:               # speech: whole forwards, graphed per (rows, frames) bucket on CUDA
        from omni_ray.dit.token2wav_graphs import Token2WavGraphs
        from omni_ray.dit.token2wav_ode import Token2WavODE
        from omni_ray.dit.vocoder_graphs import VocoderGraphs
        graphed = cfg.cuda_graphs and cuda
        graphs = Token2WavGraphs(fam, 2 * cfg.max_batch_size, capture=graphed, precision=cfg.token2wav_precision,
                                 fused=cfg.token2wav_fused_forward, compile=cfg.compile and cuda)
        graphs.ode = (Token2WavODE(graphs, first_alone=cfg.token2wav_first_window_alone)
                      if cfg.token2wav_whole_ode else None)                     # whole ODEs per engine step
        fam.vocoder_graphs = VocoderGraphs(fam, cfg.vae_batch_size, capture=graphed, forwards=graphs,
                                           max_graphs=cfg.token2wav_vocoder_graphs,
                                           precision=cfg.token2wav_vocoder_precision)     # the vocoder
        return graphs
    if cfg.cuda_graphs and cuda and layout.sp == 1:
        from omni_ray.dit.cuda_graphs import GraphedBlocks
        return GraphedBlocks(fam, max_rows=2 * cfg.max_batch_size)
    return None


def sp_subgroup(layout: Layout, rank: int, group):
    """This rank's sequence-parallel group (every rank creates every subgroup, in the same order)."""
    if layout.sp == 1:
        return None
    if layout.cfg == 1:
        return group
    backend = dist.get_backend(group)
    subs = [dist.new_group(layout.sp_ranks(c), backend=backend) for c in range(layout.cfg)]
    return subs[layout.cfg_index(rank)]


class RankFactory:
    """``make_rank`` for the WorkerGroup (pickled to the workers): each rank loads the model on its
    device; rank 0 (the engine's process) loads all of it, the workers only what a forward needs."""

    def __init__(self, cfg: DiTEngineConfig, path: Path, dtype: torch.dtype, layout: Layout):
        self.cfg, self.path, self.dtype, self.layout = cfg, Path(path), dtype, layout

    def __call__(self, ctx) -> DiTRank:
        if ctx.rank == 0:
            from omni_ray.dit.families import load_family
            fam = load_family(self.path, ctx.device, self.dtype, self.cfg.max_sequence_length,
                              self.cfg.model.allow_pickle)
        else:
            fam = load_worker_family(self.path, ctx.device, self.dtype, self.cfg)
        check_blocks(fam, self.layout)
        graphs = prepare_family(fam, self.cfg, self.layout)
        sub = sp_subgroup(self.layout, ctx.rank, ctx.group)
        log.info("DiT rank %d/%d: %s on %s", ctx.rank, self.layout.world, self.path.name, ctx.device)
        return DiTRank(fam, self.layout, ctx.rank, ctx.group, sub, graphs)
