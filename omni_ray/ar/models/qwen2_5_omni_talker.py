"""The Qwen2.5-Omni talker (transformers' ``Qwen2_5OmniTalkerForConditionalGeneration``) on the AR engine.

A Qwen2 decoder with M-RoPE over a speech-codec vocabulary, whose inputs are the thinker's states:

    row = thinker part (+ codec embedding)  [E = thinker hidden]  -> thinker_to_talker_proj -> [H] -> layers
    logits = codec_head(norm(h))  (the codec's start token suppressed, as ``generate`` always does)

The engine hands the thinker parts in through ``InputEmbeds`` (``omni_ray/ar/input_embeds.py``):
prompt rows replace the token embedding, but for the talker the codec embedding of a prompt token
is added to its row unless the token is the codec's mask token (transformers adds the codec
embeddings of the last two prompt tokens, pad and start, and none to the mask-token rows); decode
rows are the codec embedding of the fed token plus the thinker's reply row of that step. What the
thinker must hand over is built by ``omni_ray/ar/models/qwen2_5_omni_talker_inputs.py``.

Weights: ``talker.model.*`` (embed_tokens [codec, E], layers, norm), ``talker.thinker_to_talker_proj``,
``talker.codec_head`` of a ``Qwen2_5OmniForConditionalGeneration`` checkpoint, or the same without
``talker.`` in a talker-only directory (model_type ``qwen2_5_omni_talker``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ray.ar.layers.linear import Linear, VocabParallelEmbedding
from omni_ray.ar.layers.ops import Ops
from omni_ray.ar.layers.parallel import TP1, TPContext
from omni_ray.ar.models.decoder import ArchConfig, DecoderForCausalLM
from omni_ray.errors import ConfigError

MODEL_TYPE = "qwen2_5_omni_talker"


@dataclass(frozen=True)
class TalkerTokens:
    """The talker's special ids: codec tokens (its own vocabulary) and the thinker's text tokens it uses."""

    codec_bos: int          # tts_codec_start_token_id: the last prompt token; suppressed when sampling
    codec_eos: int          # tts_codec_end_token_id
    codec_pad: int          # tts_codec_pad_token_id: the second-to-last prompt token
    codec_mask: int         # tts_codec_mask_token_id: the thinker-prompt rows' token (no codec embedding)
    text_bos: int           # tts_text_start_token_id (the speaker's bos_token in spk_dict.pt takes its place)
    text_eos: int           # tts_text_end_token_id: its thinker embedding follows the last reply row
    text_pad: int           # tts_text_pad_token_id: ... and then its thinker embedding on every later step

    @classmethod
    def from_hf(cls, c: dict) -> "TalkerTokens":
        return cls(c["tts_codec_start_token_id"], c["tts_codec_end_token_id"], c["tts_codec_pad_token_id"],
                   c["tts_codec_mask_token_id"], c["tts_text_start_token_id"], c["tts_text_end_token_id"],
                   c["tts_text_pad_token_id"])

    @property
    def stop_ids(self) -> list[int]:
        """What ends a talker sequence: transformers' ``talker_eos_token_id`` default [8292, 8294] is the
        7B checkpoint's (pad, end)."""
        return [self.codec_pad, self.codec_eos]


def talker_config(cfg: dict) -> dict:
    """The talker's config.json section: ``talker_config`` of a whole Omni checkpoint, or the file itself."""
    mt = cfg.get("model_type")
    if mt == "qwen2_5_omni":
        if not cfg.get("talker_config"):
            raise ConfigError("this qwen2_5_omni checkpoint has no talker_config (a thinker-only checkpoint)")
        return cfg["talker_config"]
    if mt == MODEL_TYPE:
        return cfg
    raise ConfigError(f"submodel 'talker' needs a qwen2_5_omni or {MODEL_TYPE} checkpoint, got model_type={mt!r}")


def talker_arch(cfg: dict) -> ArchConfig:
    """ArchConfig of the talker's decoder (Qwen2: q/k/v biases, M-RoPE) with its input width and tokens."""
    whole = cfg.get("model_type") == "qwen2_5_omni"
    c = talker_config(cfg)
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"talker: unsupported hidden_act {c.get('hidden_act')!r}")
    if c.get("use_sliding_window"):
        raise ConfigError("talker: sliding-window attention is not supported")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    rope.setdefault("rope_theta", c.get("rope_theta", 1000000.0))
    mrope = list(rope.pop("mrope_section", None) or [16, 24, 24])
    if rope.get("rope_type", rope.get("type")) == "mrope":
        rope["rope_type"] = rope["type"] = "default"
    if sum(mrope) != head_dim // 2:
        raise ConfigError(f"talker: mrope_section {mrope} does not cover head_dim/2 = {head_dim // 2}")
    tokens = TalkerTokens.from_hf(c)
    prefixes = ((("talker.model.", ""), ("talker.codec_head.", "lm_head."), ("talker.", "")) if whole else
                (("model.", ""), ("codec_head.", "lm_head.")))
    ignored = ("thinker.", "token2wav.") if whole else ()
    return ArchConfig(
        model_type=MODEL_TYPE, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=head_dim,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6), max_position=c.get("max_position_embeddings", 32768),
        tie_word_embeddings=False, qkv_bias=True, qk_norm=False, rope=rope, eos_token_ids=tokens.stop_ids,
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype") or c.get("dtype"), mrope_section=mrope,
        weight_prefixes=prefixes, ignored_prefixes=ignored, input_size=c["embedding_size"], talker=tokens)


class Qwen2_5OmniTalkerForCausalLM(DecoderForCausalLM):
    """The talker: codec embeddings [codec, E] and the thinker rows summed in E, projected to the decoder's
    width by ``thinker_to_talker_proj``; ``lm_head`` is the checkpoint's ``codec_head``."""

    def __init__(self, c: ArchConfig, tp: TPContext = TP1, backend: str = "torch", ops: Ops | None = None):
        super().__init__(c, tp, backend, ops)
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.input_size, tp)
        self.thinker_to_talker_proj = Linear(c.input_size, c.hidden_size, True, tp)
        self.tokens: TalkerTokens = c.talker

    def embed(self, input_ids: torch.Tensor, embeds=None, add_embeds=None) -> torch.Tensor:
        """Rows [N, H]: prompt rows (``embeds``) + the codec embedding of their token unless it is the mask
        token; other rows: the codec embedding + ``add_embeds`` (the thinker's reply row); then projected."""
        x = self.embed_tokens(input_ids)
        if embeds is not None:
            rows, values = embeds
            codec = x.index_select(0, rows)
            keep = (input_ids.index_select(0, rows) != self.tokens.codec_mask).unsqueeze(-1)
            x = x.index_copy(0, rows, values.to(x.dtype) + codec * keep)
        if add_embeds is not None:
            rows, values = add_embeds
            x = x.index_copy(0, rows, x.index_select(0, rows) + values.to(x.dtype))
        return self.thinker_to_talker_proj(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Codec logits; the start token never sampled (transformers passes ``suppress_tokens=[codec_bos]``)."""
        logits = self.lm_head(hidden)
        logits[:, self.tokens.codec_bos] = float("-inf")
        return logits
