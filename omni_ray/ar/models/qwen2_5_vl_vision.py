"""Qwen2.5-VL vision tower (also the Qwen2.5-Omni thinker's) in plain PyTorch.

Input as the HF image processor gives it: ``pixel_values`` [N_patches, C*T*P*P] (patches of each
image in spatial-merge-block-major order) and ``grid_thw`` [num_images, 3] (temporal, height,
width in patches). Output: [N_patches / merge², out_hidden_size], the embeddings that replace the
image placeholder tokens, images in input order.

Architecture (``vision_config``): a patch embedding (Conv3d over T×P×P with stride = kernel, done
as one matmul), ``depth`` pre-norm blocks (RMSNorm, attention with 2D rotary over (h, w), RMSNorm,
SwiGLU MLP); blocks in ``fullatt_block_indexes`` attend over whole frames, the others within
windows of ``window_size`` pixels. Tokens are reordered window by window (in units of merge×merge
blocks) before the blocks and restored after the patch merger (RMSNorm, merge² tokens concatenated,
Linear-GELU-Linear).

Parameter names are the checkpoint's (``visual.blocks.0.attn.qkv.weight`` ...); the Omni tower's
separate ``attn.q/k/v`` are fused into ``attn.qkv`` at load time (``load_vision_tower``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni_ray.errors import ConfigError

_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=list)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, cfg: dict) -> "VisionConfig":
        """From a ``vision_config`` dict (Qwen2_5_VLVisionConfig / Qwen2_5OmniVisionEncoderConfig)."""
        rope = cfg.get("rope_parameters") or {}
        act = cfg.get("hidden_act", "silu")
        if act not in _ACTS:
            raise ConfigError(f"unsupported vision hidden_act {act!r}")
        merge, patch, window = cfg.get("spatial_merge_size", 2), cfg.get("patch_size", 14), cfg.get("window_size", 112)
        if window // merge // patch < 1:
            raise ConfigError(f"vision window_size {window} is smaller than one merged patch ({merge}x{patch} pixels)")
        return cls(depth=cfg["depth"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                   num_heads=cfg["num_heads"], out_hidden_size=cfg["out_hidden_size"],
                   in_channels=cfg.get("in_channels", cfg.get("in_chans", 3)), patch_size=patch,
                   temporal_patch_size=cfg.get("temporal_patch_size", 2),
                   spatial_merge_size=merge, window_size=window,
                   fullatt_block_indexes=list(cfg.get("fullatt_block_indexes", [])), hidden_act=act,
                   rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))


# ---------------------------------------------------------------- shared pieces


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: statistics in float32, the weight applied in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Segments:
    """The segments of a varlen attention call, planned once per forward (every layer reuses it).
    Segments of one length run as one batched SDPA call: as a view [B, L, ...] of the packed rows
    when they sit back to back (no copy; e.g. every window of an image whose size is a multiple of
    the window), else gathered by a row index made here once. ``cu_seqlens`` [S + 1]."""

    def __init__(self, cu_seqlens: torch.Tensor, device: torch.device):
        bounds = cu_seqlens.tolist()
        by_len: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                by_len.setdefault(end - start, []).append(start)
        self.groups: list[tuple[int, int, slice | torch.Tensor]] = []     # (count, length, rows)
        for length, starts in by_len.items():
            if starts[-1] - starts[0] == (len(starts) - 1) * length:       # back to back
                rows = slice(starts[0], starts[0] + len(starts) * length)
            else:
                rows = (torch.tensor(starts)[:, None] + torch.arange(length)).flatten().to(device)
            self.groups.append((len(starts), length, rows))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        out = None
        for count, length, rows in self.groups:
            qs, ks, vs = (t[rows].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(-1, *q.shape[1:])  # [B*L, H, D]
            if count * length == n and isinstance(rows, slice):       # one group covers every row
                return o
            if out is None:
                out = torch.empty_like(q)
            out[rows] = o
        return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """Bidirectional attention within each segment ``cu_seqlens[i]:cu_seqlens[i+1]`` (or a ``Segments``
    plan of them). q, k, v: [N, H, D] -> [N, H, D]."""
    plan = cu_seqlens if isinstance(cu_seqlens, Segments) else Segments(cu_seqlens, q.device)
    return plan(q, k, v)


# ---------------------------------------------------------------- index bookkeeping (grid_thw only)


def rotary_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) of each patch in the processor's order (merge×merge blocks, row-major): [N, 2]."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h)[:, None].expand(h, w)
        wpos = torch.arange(w)[None, :].expand(h, w)
        hw = torch.stack([hpos, wpos], -1).reshape(h // merge, merge, w // merge, merge, 2)
        out.append(hw.permute(0, 2, 1, 3, 4).reshape(-1, 2).repeat(t, 1))
    return torch.cat(out)


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Full-attention segments: each frame (h*w patches) of each image/video: [num_frames + 1]."""
    lens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)


def window_order(grid_thw: torch.Tensor, merge: int, window_merged: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the merged tokens (merge×merge blocks) window by window, and the windows' bounds in
    patches. Windows tile each frame's merged grid row-major, ``window_merged`` blocks a side (the
    last row/column of windows may be smaller); inside a window blocks keep row-major order.
    Returns (window_index [N / merge²], cu_window_seqlens [num_windows + 1] in patches)."""
    order, sizes, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        nwh, nww = -(-gh // window_merged), -(-gw // window_merged)
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        key = (tt * nwh + hh // window_merged) * nww + ww // window_merged          # [t, gh, gw] window id
        key = key.flatten()
        order.append(torch.sort(key, stable=True).indices + offset)
        counts = torch.bincount(key, minlength=t * nwh * nww)
        sizes.append(counts[counts > 0])
        offset += t * gh * gw
    cu = F.pad(torch.cat(sizes).cumsum(0) * merge * merge, (1, 0))
    return torch.cat(order), cu.to(torch.int32)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2D rotary tables: the first half of each head's rotary angles from h, the second from w
    (head_dim/4 frequencies each), then duplicated for rotate_half. positions [N, 2] -> cos, sin [N, head_dim]."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))   # [head_dim/4]
    angles = (positions[..., None].float() * inv_freq).flatten(1)                             # [N, head_dim/2]
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated in float32 (rotate_half convention); cos/sin [N, D] (two equal halves)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, -1)
    half = x1.shape[-1]
    c, s = cos[:, None, :half], sin[:, None, :half]
    out = torch.empty_like(x)
    out[..., :half] = x1 * c - x2 * s
    out[..., half:] = x2 * c + x1 * s
    return out


# ---------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Conv3d with stride == kernel over one patch each == a matmul: [N, C*T*P*P] -> [N, hidden]
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cu_seqlens, cos, sin):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)      # [N, H, D] each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj(varlen_attention(q, k, v, cu_seqlens).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = _ACTS[cfg.hidden_act]

        self.gate_up: nn.Linear | None = None       # fused and padded for the GPU (``fuse``)

    def forward(self, x):
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, -1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    @torch.no_grad()
    def fuse(self, multiple: int = 128) -> None:
        """One gate+up GEMM, the intermediate size padded with zero rows / columns to ``multiple``
        (Qwen2.5-VL's 3420 makes cuBLAS fall back to slow kernels on Hopper). Exact: a padded unit
        is act(0) * 0 = 0 and meets a zero column of down_proj."""
        inter, hidden = self.gate_proj.weight.shape
        pad = -inter % multiple
        w = self.gate_proj.weight
        gate_up = nn.Linear(hidden, 2 * (inter + pad), bias=True, device=w.device, dtype=w.dtype)
        gate_up.weight.zero_()
        gate_up.bias.zero_()
        for i, lin in enumerate((self.gate_proj, self.up_proj)):
            rows = slice(i * (inter + pad), i * (inter + pad) + inter)
            gate_up.weight[rows] = lin.weight
            gate_up.bias[rows] = lin.bias
        down = nn.Linear(inter + pad, hidden, bias=True, device=w.device, dtype=w.dtype)
        down.weight.zero_()
        down.weight[:, :inter] = self.down_proj.weight
        down.bias.copy_(self.down_proj.bias)
        self.gate_up, self.down_proj = gate_up.requires_grad_(False), down.requires_grad_(False)
        del self.gate_proj, self.up_proj


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.hidden_size), RMSNorm(cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(),
                                 nn.Linear(self.width, cfg.out_hidden_size))

    def forward(self, x):                       # [N, hidden] -> [N / merge², out_hidden]
        return self.mlp(self.ln_q(x).view(-1, self.width))


class Qwen2_5VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def num_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        """Placeholder tokens per image/video: t*h*w / merge²."""
        return (grid_thw.prod(-1) // self.cfg.spatial_merge_size ** 2).tolist()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P], grid_thw [num_images, 3] -> [N / merge², out_hidden_size]."""
        cfg, unit = self.cfg, self.cfg.spatial_merge_size ** 2
        grid_thw = grid_thw.cpu()
        dev = pixel_values.device
        window_index, cu_window = window_order(grid_thw, cfg.spatial_merge_size,
                                               cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)
        cu_full = frame_cu_seqlens(grid_thw)
        head_dim = cfg.hidden_size // cfg.num_heads
        cos, sin = rotary_cos_sin(rotary_positions(grid_thw, cfg.spatial_merge_size), head_dim, cfg.rope_theta)

        def to_windows(t: torch.Tensor) -> torch.Tensor:           # [N, X] in merge-block units
            return t.view(-1, unit, t.shape[-1])[window_index.to(t.device)].view(-1, t.shape[-1])

        x = to_windows(self.patch_embed(pixel_values))              # [N, hidden]
        cos, sin = to_windows(cos.to(dev)), to_windows(sin.to(dev))
        full, windows = Segments(cu_full, dev), Segments(cu_window, dev)   # planned once, used by every block
        for i, blk in enumerate(self.blocks):
            x = blk(x, full if i in cfg.fullatt_block_indexes else windows, cos, sin)
        merged = self.merger(x)                                     # [N / merge², out_hidden]
        return merged[torch.argsort(window_index).to(dev)]


# ---------------------------------------------------------------- loading


# where each checkpoint family keeps its vision config and tower weights
_FAMILIES = {
    "qwen2_5_vl": ((), ("visual.", "model.visual.")),
    "qwen2_5_omni": (("thinker_config",), ("thinker.visual.", "thinker.model.visual.")),
    "qwen2_5_omni_thinker": ((), ("thinker.visual.", "visual.", "model.visual.")),
}


def sub_config(cfg: dict, family_path: tuple[str, ...], key: str) -> dict:
    for part in family_path:
        cfg = cfg[part]
    if key not in cfg:
        raise ConfigError(f"config.json has no {key}")
    return cfg[key]


def read_family(path: Path) -> tuple[dict, tuple[str, ...], tuple[str, ...]]:
    from omni_ray.ar.models.loader import read_hf_config

    cfg = read_hf_config(Path(path))
    mt = cfg.get("model_type")
    if mt not in _FAMILIES:
        raise ConfigError(f"model_type {mt!r} has no vision/audio encoder here; supported: {sorted(_FAMILIES)}")
    return cfg, *_FAMILIES[mt]


def load_tensors(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the first of ``prefixes`` that has any, prefix removed
    (safetensors only; each file opened once, only the matching tensors read)."""
    from safetensors import safe_open

    from omni_ray.ar.models.loader import weight_files

    found: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for f in weight_files(Path(path)):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                for p in prefixes:
                    if name.startswith(p):
                        found[p][name[len(p):]] = st.get_tensor(name)
                        break
    for p in prefixes:
        if found[p]:
            return found[p]
    raise ConfigError(f"{path}: no tensors under {prefixes}")


def fuse_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Omni's ``attn.q/k/v.{weight,bias}`` -> ``attn.qkv.*`` (rows q, k, v as Qwen2.5-VL's qkv)."""
    out = {}
    for name, t in sd.items():
        if ".attn.q." in name:
            parts = [sd[name.replace(".attn.q.", f".attn.{x}.")] for x in "qkv"]
            out[name.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts, 0)
        elif ".attn.k." not in name and ".attn.v." not in name:
            out[name] = t
    return out


def load_state(module: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict copy: every parameter loaded, no tensor left over."""
    params = dict(module.named_parameters())
    missing, extra = set(params) - set(sd), set(sd) - set(params)
    if missing or extra:
        raise ConfigError(f"{where}: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(sd[name].shape) != tuple(p.shape):
                raise ConfigError(f"{where}: {name} has shape {tuple(sd[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(sd[name])


def load_vision_tower(path: str | Path, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu") -> Qwen2_5VisionTower:
    """Build the vision tower from ``config.json`` (``vision_config`` of Qwen2.5-VL, of Qwen2.5-Omni's
    ``thinker_config``) and load its weights (``visual.*`` / ``thinker.visual.*``, or transformers 5's
    in-memory ``model.visual.*`` / ``thinker.model.visual.*``). ``dtype``: None keeps float32."""
    cfg, family_path, prefixes = read_family(Path(path))
    vcfg = VisionConfig.from_hf(sub_config(cfg, family_path, "vision_config"))
    with torch.device("meta"):
        tower = Qwen2_5VisionTower(vcfg)
    tower = tower.to_empty(device="cpu")
    load_state(tower, fuse_qkv(load_tensors(Path(path), prefixes)), f"{path} vision tower")
    tower = tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if torch.device(device).type == "cuda":
        for blk in tower.blocks:
            blk.mlp.fuse()
    return tower
