"""Llama-family decoder (Llama 3, Qwen2/2.5, Qwen3) in plain PyTorch, tensor-parallel ready.

The three differ only in small switches read from config.json: Qwen2 has q/k/v biases,
Qwen3 normalises q and k per head before rotary, Llama 3 scales its rotary frequencies.
Activations are flat over the step's tokens: x [N, hidden], no batch/padding dimension.

The language models of Qwen2.5-VL and of the Qwen2.5-Omni thinker are Qwen2 decoders with
M-RoPE (``mrope_section``): their settings come from the nested ``text_config`` (and
``thinker_config``), their weights from ``model.*`` / ``model.language_model.*`` /
``thinker.model.*``; the encoders', talker's and token2wav's tensors are skipped by name
(``ArchConfig.ignored_prefixes``). Positions are [N] (text) or [3, N] (a prompt with media, see
``omni_ray/ar/models/mrope.py``); ``embeds`` overwrite the token embeddings of some rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from omni_ray.ar.layers.attention import Attention, AttnMetadata
from omni_ray.ar.layers.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from omni_ray.ar.layers.ops import Ops, mrope_cos_sin, mrope_rows, rope_cos_sin
from omni_ray.ar.layers.parallel import TP1, TPContext
from omni_ray.errors import ConfigError

# multimodal families: where the language model's settings are (config.json keys, outermost first),
# its checkpoint prefixes (checkpoint -> ours, first match wins) and the tensors skipped on purpose
_TEXT_FAMILIES = ("qwen3", "qwen2", "llama")
_MM_FAMILIES = {
    "qwen2_5_vl": (("text_config",),
                   (("model.language_model.", ""), ("model.", ""), ("lm_head.", "lm_head."))),
    "qwen2_5_omni": (("thinker_config", "text_config"),
                     (("thinker.model.language_model.", ""), ("thinker.model.", ""),
                      ("thinker.lm_head.", "lm_head."))),
    "qwen2_5_omni_thinker": (("text_config",),
                             (("model.language_model.", ""), ("model.", ""), ("lm_head.", "lm_head."))),
}
# tensors of the vision / audio encoders (loaded by their own loaders), the talker and token2wav
_MM_IGNORED = ("visual.", "model.visual.", "thinker.visual.", "thinker.model.visual.",
               "audio_tower.", "model.audio_tower.", "thinker.audio_tower.", "thinker.model.audio_tower.",
               "talker.", "token2wav.")


def _language_config(cfg: dict) -> dict:
    """The language model's settings: the nested configs (``text_config`` ...) over the outer ones,
    so that both transformers 5 (nested) and 4.x (flat Qwen2.5-VL) config.json files read the same."""
    out = dict(cfg)
    for key in _MM_FAMILIES[cfg["model_type"]][0]:
        cfg = cfg.get(key) or {}
        out.update({k: v for k, v in cfg.items() if v is not None and k != "model_type"})
    return out


@dataclass
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope: dict = field(default_factory=dict)
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    mrope_section: list[int] | None = None          # M-RoPE: head-dim/2 sections taking t, h, w positions
    weight_prefixes: tuple[tuple[str, str], ...] = (("model.", ""),)   # checkpoint prefix -> ours
    ignored_prefixes: tuple[str, ...] = ()          # checkpoint tensors skipped on purpose
    input_size: int | None = None     # width of the input embeddings when the model projects them (the talker)
    talker: object | None = None      # the Qwen2.5-Omni talker's special tokens (qwen2_5_omni_talker.TalkerTokens)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ArchConfig":
        """The architecture of ``cfg`` (config.json); a checkpoint's other submodels: ``models.arch_config``."""
        mt = cfg.get("model_type")
        if mt not in _TEXT_FAMILIES and mt not in _MM_FAMILIES:
            raise ConfigError(f"unsupported architecture model_type={mt!r} "
                              f"(architectures={cfg.get('architectures')}); supported: "
                              f"{', '.join(_TEXT_FAMILIES + tuple(_MM_FAMILIES))}")
        if mt in _MM_FAMILIES:
            return cls._multimodal(mt, _language_config(cfg))
        return cls._build(mt, cfg, qwen2_style=mt == "qwen2", head_dim=cfg.get("head_dim"))

    @classmethod
    def _multimodal(cls, mt: str, cfg: dict) -> "ArchConfig":
        """Qwen2.5-VL / Omni thinker language model: Qwen2 (q/k/v biases, no q/k norm) with M-RoPE.
        Qwen2.5-VL's attention always splits hidden_size evenly over the heads; Omni's takes
        ``head_dim`` when the config has one."""
        even = cfg["hidden_size"] // cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or even
        if mt == "qwen2_5_vl" and head_dim != even:
            raise ConfigError(f"qwen2_5_vl: head_dim {head_dim} != hidden_size / num_attention_heads ({even})")
        arch = cls._build(mt, cfg, qwen2_style=True, head_dim=head_dim)
        arch.mrope_section = list(arch.rope.pop("mrope_section", None) or [16, 24, 24])
        if arch.rope.get("rope_type", arch.rope.get("type")) == "mrope":    # transformers 4.x spelling
            arch.rope["rope_type"] = arch.rope["type"] = "default"
        if sum(arch.mrope_section) != head_dim // 2:
            raise ConfigError(f"{mt}: mrope_section {arch.mrope_section} does not cover head_dim/2 = {head_dim // 2}")
        arch.weight_prefixes, arch.ignored_prefixes = _MM_FAMILIES[mt][1], _MM_IGNORED
        return arch

    @classmethod
    def _build(cls, mt: str, cfg: dict, qwen2_style: bool, head_dim: int | None) -> "ArchConfig":
        if cfg.get("use_sliding_window") and qwen2_style:
            raise ConfigError("sliding-window attention is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {cfg.get('hidden_act')!r}")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        return cls(
            model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), max_position=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=qwen2_style or bool(cfg.get("attention_bias", False)),
            qk_norm=mt == "qwen3", rope=rope,
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.ops = eps, ops

    def forward(self, x, residual=None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class DecoderAttention(nn.Module):
    def __init__(self, c: ArchConfig, ops: Ops, tp: TPContext, backend: str):
        super().__init__()
        self.ops = ops
        self.qkv_proj = QKVParallelLinear(c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.qkv_bias, tp)
        self.nh, self.nkv, self.d = self.qkv_proj.n_heads, self.qkv_proj.n_kv_heads, c.head_dim
        self.o_proj = RowParallelLinear(c.num_heads * c.head_dim, c.hidden_size, False, tp)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, ops)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, ops)
        self.qk_norm = c.qk_norm
        self.attn = Attention(self.nh, self.nkv, self.d, c.head_dim ** -0.5, backend)
        self.fused = backend != "torch"      # CUDA: norm + rotary + KV store in one Triton kernel

    def forward(self, qkv, positions, cos, sin, meta: AttnMetadata):
        """qkv [N, (Hq + 2 Hkv) D] (the projection is fused with the norm before it, in the layer);
        cos/sin: per-token rows [N, D/2] (torch path) or the whole tables [max_pos, D/2] (fused)."""
        n = qkv.shape[0]
        qw, kw, eps = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else (None, None, 0.0)
        if self.fused:
            from omni_ray.ar.kernels.triton_qkv import qkv_norm_rope_store
            q = qkv_norm_rope_store(qkv, positions, cos, sin, self.nh, self.nkv, self.d, qw, kw, eps,
                                    self.attn.k_cache, self.attn.v_cache, meta.slot_mapping)
            o = self.attn(q, None, None, meta)                        # K/V already in the cache
        else:
            q, k, v = self.ops.qkv_norm_rope(qkv, cos, sin, self.nh, self.nkv, self.d, qw, kw, eps)
            o = self.attn(q, k, v, meta)                              # [N, Hq, D]
        return self.o_proj.reduce(self.ops.linear(o.view(n, -1), self.o_proj.weight))


class MLP(nn.Module):
    def __init__(self, c: ArchConfig, ops: Ops, tp: TPContext):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = MergedColumnParallelLinear(c.hidden_size, [c.intermediate_size] * 2, False, tp)
        self.down_proj = RowParallelLinear(c.intermediate_size, c.hidden_size, False, tp)

    def forward(self, gate_up):
        """gate_up [N, 2 I] (the projection is fused with the norm before it, in the layer)"""
        return self.down_proj.reduce(self.ops.silu_mul_linear(gate_up, self.down_proj.weight))


class DecoderLayer(nn.Module):
    def __init__(self, c: ArchConfig, ops: Ops, tp: TPContext, backend: str):
        super().__init__()
        self.self_attn = DecoderAttention(c, ops, tp, backend)
        self.mlp = MLP(c, ops, tp)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, ops)

    def forward(self, x, residual, positions, cos, sin, meta):
        """x, residual [N, hidden] -> this layer's output and the residual stream before it."""
        ops, attn, mlp = self.self_attn.ops, self.self_attn, self.mlp
        ln = self.input_layernorm
        qkv, residual = ops.norm_linear(x, residual, ln.weight, ln.eps, attn.qkv_proj.weight, attn.qkv_proj.bias)
        x = attn(qkv, positions, cos, sin, meta)
        ln = self.post_attention_layernorm
        gate_up, residual = ops.norm_linear(x, residual, ln.weight, ln.eps, mlp.gate_up_proj.weight)
        return mlp(gate_up), residual


class DecoderForCausalLM(nn.Module):
    # checkpoint name -> (our parameter name, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, c: ArchConfig, tp: TPContext = TP1, backend: str = "torch", ops: Ops | None = None):
        super().__init__()
        self.config = c
        self.ops = ops or Ops()
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(c, self.ops, tp, backend) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.ops)
        self.lm_head = ParallelLMHead(c.vocab_size, c.hidden_size, tp)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cos_sin(c.head_dim, c.max_position, c.rope)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # M-RoPE: [D/2] int64, the position row (t/h/w) of each rotary frequency; None for 1-D RoPE models
        rows = mrope_rows(c.mrope_section, c.head_dim // 2) if c.mrope_section else None
        self.register_buffer("mrope_rows", rows, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                capture_layers: tuple[int, ...] = (), embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                add_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """input_ids [N]; positions [N], or [3, N] (t, h, w) for M-RoPE -> final hidden states
        [N, hidden] (normed), and the residual stream after each layer in ``capture_layers`` (HF
        ``hidden_states`` indexing). ``embeds`` = (rows [M] int64, values [M, hidden]): encoder
        outputs or prompt embeddings that replace the token embeddings of those rows (the placeholder
        tokens); ``add_embeds`` = (rows, values): added to the token embeddings of those rows."""
        positions, cos, sin = self.rope(positions)
        x, residual = self.embed(input_ids, embeds, add_embeds), None
        captured = {0: x} if 0 in capture_layers else {}
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, cos, sin, meta)
            if i + 1 in capture_layers and i + 1 < len(self.layers):
                captured[i + 1] = x + residual
        x, _ = self.norm(x, residual)
        return x, captured

    def embed(self, input_ids: torch.Tensor, embeds=None, add_embeds=None) -> torch.Tensor:
        """The input rows [N, hidden]: token embeddings, ``embeds`` rows replaced, ``add_embeds`` rows added."""
        x = self.embed_tokens(input_ids)
        if embeds is not None:
            rows, values = embeds
            x = x.index_copy(0, rows, values.to(x.dtype))
        if add_embeds is not None:
            rows, values = add_embeds
            x = x.index_add(0, rows, values.to(x.dtype))
        return x

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions the attention layers get, cos, sin). 1-D positions: the fused kernel reads the
        whole tables by position, the torch path gets per-token rows [N, D/2]. M-RoPE [3, N]: per-token
        rows [N, D/2] built here; the fused kernel then reads them through positions 0..N-1."""
        fused = self.layers[0].self_attn.fused
        if positions.dim() == 1:
            if fused:
                return positions, self.rope_cos, self.rope_sin
            return positions, self.rope_cos[positions], self.rope_sin[positions]
        if self.mrope_rows is None:
            raise ValueError(f"{self.config.model_type} has no M-RoPE; positions must be [N]")
        cos, sin = mrope_cos_sin(self.rope_cos, self.rope_sin, positions, self.mrope_rows)   # [N, D/2]
        if fused:
            return torch.arange(positions.shape[1], device=positions.device), cos, sin
        return positions[0], cos, sin

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
