"""Qwen2.5-Omni thinker's audio encoder (Whisper-style) in plain PyTorch.

Input as the HF processor gives it: ``input_features`` [B, num_mel_bins, frames] (log-mel, padded)
and ``feature_attention_mask`` [B, frames] (1 on real frames). Output: [sum of tokens, output_dim],
the embeddings that replace the audio placeholder tokens, clips in input order; a clip of L frames
gives ((L - 1) // 2 + 1) // 2 tokens.

Architecture (``audio_config``): each clip is cut into chunks of ``2 * n_window`` frames (the last
may be shorter); per chunk conv1 (k3) + GELU, conv2 (k3, stride 2) + GELU, plus sinusoidal positions
that restart at every chunk; ``encoder_layers`` pre-LayerNorm blocks whose attention stays inside a
chunk; then per clip an average pool over pairs of frames, LayerNorm (``ln_post``) and a projection
to the thinker's hidden size (``proj``). ``audio_bos_eos_token`` is in the checkpoint but unused by
the encoder (as in transformers), so it is not loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni_ray.ar.models.qwen2_5_vl_vision import (
    _ACTS,
    load_state,
    load_tensors,
    read_family,
    sub_config,
    varlen_attention,
)

_UNUSED = ("audio_bos_eos_token.weight",)

# where each checkpoint family keeps its audio tower weights
_PREFIXES = {"qwen2_5_omni": ("thinker.audio_tower.", "thinker.model.audio_tower."),
             "qwen2_5_omni_thinker": ("thinker.audio_tower.", "audio_tower.", "model.audio_tower.")}


@dataclass
class AudioConfig:
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    output_dim: int
    n_window: int
    max_source_positions: int
    activation_function: str = "gelu"

    @classmethod
    def from_hf(cls, cfg: dict) -> "AudioConfig":
        """From an ``audio_config`` dict (Qwen2_5OmniAudioEncoderConfig)."""
        return cls(num_mel_bins=cfg.get("num_mel_bins", 128), d_model=cfg["d_model"],
                   encoder_layers=cfg["encoder_layers"], encoder_attention_heads=cfg["encoder_attention_heads"],
                   encoder_ffn_dim=cfg["encoder_ffn_dim"], output_dim=cfg["output_dim"],
                   n_window=cfg.get("n_window", 100), max_source_positions=cfg.get("max_source_positions", 1500),
                   activation_function=cfg.get("activation_function", "gelu"))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions: [length, channels] = [sin | cos]."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2).float())
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], 1)


def conv_len(n: torch.Tensor) -> torch.Tensor:
    """Frames after the stride-2 conv."""
    return (n - 1) // 2 + 1


def output_lengths(feature_lens: torch.Tensor) -> torch.Tensor:
    """Audio placeholder tokens per clip of ``feature_lens`` mel frames."""
    return (conv_len(feature_lens) - 2) // 2 + 1


def chunk_lengths(feature_lens: torch.Tensor, n_window: int) -> torch.Tensor:
    """Each clip cut into chunks of 2*n_window frames, the last one shorter: [num_chunks]."""
    size, out = 2 * n_window, []
    for n in feature_lens.tolist():
        full, rest = divmod(n, size)
        out += [size] * full + ([rest] if rest else [])
    return torch.tensor(out, dtype=torch.long)


def flatten_features(input_features: torch.Tensor,
                     feature_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Processor output -> (frames of all clips [total_frames, mel], feature_lens [B])."""
    mask = feature_attention_mask.bool()
    return input_features.transpose(1, 2)[mask], mask.sum(1).cpu()


class AudioAttention(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x, cu_seqlens):
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.num_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(varlen_attention(q, k, v, cu_seqlens).reshape(n, -1))


class AudioLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = AudioAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.act = _ACTS[cfg.activation_function]

    def forward(self, x, cu_seqlens):
        x = x + self.self_attn(self.self_attn_layer_norm(x), cu_seqlens)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            big = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-big, big)
        return x


class Qwen2_5OmniAudioTower(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList(AudioLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.output_dim)
        self.register_buffer("positions", sinusoids(cfg.max_source_positions, d), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the position table (after building on the meta device)."""
        self.positions = sinusoids(self.cfg.max_source_positions, self.cfg.d_model).to(self.positions.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def num_tokens(self, feature_attention_mask: torch.Tensor) -> list[int]:
        return output_lengths(feature_attention_mask.sum(-1)).tolist()

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        """input_features [B, mel, frames], feature_attention_mask [B, frames] -> [sum tokens, output_dim]."""
        frames, feature_lens = flatten_features(input_features, feature_attention_mask)
        return self.encode(frames, feature_lens)

    def encode(self, frames: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """frames [total_frames, mel] (clips back to back), feature_lens [B] -> [sum tokens, output_dim]."""
        feature_lens = feature_lens.cpu().long()
        chunks = chunk_lengths(feature_lens, self.cfg.n_window)                       # [C]
        x = self.embed_chunks(frames.to(self.dtype), chunks)                          # [sum conv_len(chunks), d]
        cu = F.pad(conv_len(chunks).cumsum(0), (1, 0)).to(torch.int32)
        for layer in self.layers:
            x = layer(x, cu)
        x = self.pool_pairs(x, conv_len(feature_lens))                               # [sum tokens, d]
        return self.proj(self.ln_post(x))

    def embed_chunks(self, frames: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """Convolutions + positions per chunk (chunks padded to the longest), valid frames kept."""
        padded = nn.utils.rnn.pad_sequence(frames.split(chunks.tolist()), batch_first=True)   # [C, Lmax, mel]
        dev = frames.device
        valid = (torch.arange(padded.shape[1], device=dev) < chunks.to(dev)[:, None])        # [C, Lmax]
        h = F.gelu(self.conv1(padded.transpose(1, 2))) * valid[:, None]                      # [C, d, Lmax]
        h = F.gelu(self.conv2(h)).transpose(1, 2)                                            # [C, L', d]
        h = h + self.positions[: h.shape[1]].to(h.dtype)
        keep = torch.arange(h.shape[1], device=dev) < conv_len(chunks).to(dev)[:, None]     # [C, L']
        return h[keep]

    @staticmethod
    def pool_pairs(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Per clip (``lens`` frames each, back to back): mean of frames (2i, 2i+1), an odd last frame dropped."""
        out = []
        for seg in x.split(lens.tolist()):
            n = seg.shape[0] // 2 * 2
            out.append(seg[:n].view(n // 2, 2, -1).mean(1))
        return torch.cat(out)


def load_audio_tower(path: str | Path, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> Qwen2_5OmniAudioTower:
    """Build the audio encoder from ``config.json`` (``thinker_config.audio_config`` of Qwen2.5-Omni)
    and load its weights (``thinker.audio_tower.*``). ``dtype``: None keeps float32."""
    from omni_ray.errors import ConfigError

    cfg, family_path, _ = read_family(Path(path))
    if cfg.get("model_type") not in _PREFIXES:
        raise ConfigError(f"{path}: model_type {cfg.get('model_type')!r} has no audio encoder")
    acfg = AudioConfig.from_hf(sub_config(cfg, family_path, "audio_config"))
    with torch.device("meta"):
        tower = Qwen2_5OmniAudioTower(acfg)
    tower = tower.to_empty(device="cpu")
    tower.reset_buffers()
    sd = {k: v for k, v in load_tensors(Path(path), _PREFIXES[cfg["model_type"]]).items() if k not in _UNUSED}
    load_state(tower, sd, f"{path} audio tower")
    return tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
