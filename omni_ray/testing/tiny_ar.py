"""Small AR checkpoints in real architectures' shapes, with random weights.

``TINY_AR`` holds tiny configs (for tests and the default app); ``SHAPES`` holds the shapes
of real models (for benchmarks). Both are built with transformers' own config and model
classes and written with ``save_pretrained`` (config.json + safetensors + tokenizer), so the
engine loads them through the same code path as a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from omni_ray.testing.tokenizer import real_template, save_tokenizer

_ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 500000.0}

# each family's real chat template (omni_ray/testing/templates): tools render as they do for the real model
CHAT_TEMPLATES = {"Qwen3Config": "qwen3", "Qwen2Config": "qwen2_5", "LlamaConfig": "llama3_1"}

# name -> (config class name, tokens, config kwargs)
TINY_AR: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("Qwen3Config", "chatml", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=4096)),
    "qwen3-wide": ("Qwen3Config", "chatml", dict(   # 4 KV heads: splits across 2 and 4 ranks
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, tie_word_embeddings=False, max_position_embeddings=4096)),
    "qwen2": ("Qwen2Config", "chatml", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=4096)),
    "llama": ("LlamaConfig", "llama3", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=4096,
        rope_parameters=_ROPE_LLAMA3)),
}

SHAPES: dict[str, tuple[str, str, dict]] = {
    "qwen3-0.6b": ("Qwen3Config", "chatml", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3-8b": ("Qwen3Config", "chatml", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}


def build_ar(out: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
             device: str = "cpu") -> None:
    """Write an HF-format checkpoint for ``name`` (a key of TINY_AR or SHAPES) into ``out``."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, template, kw = TINY_AR.get(name) or SHAPES[name]
    special = save_tokenizer(out, template, fill_to=None if name in TINY_AR else kw.get("vocab_size"),
                             chat_template=real_template(CHAT_TEMPLATES[cls_name]), template_tokens=True)
    eos = special["<|im_end|>"] if template == "chatml" else special["<|eot_id|>"]
    kw = dict(kw)
    kw.setdefault("vocab_size", 1024)
    if name in TINY_AR:
        kw.setdefault("initializer_range", 0.1)  # spread logits: greedy ties are unlikely
    config = getattr(transformers, cls_name)(
        **kw, eos_token_id=eos, pad_token_id=special["<|endoftext|>"],
        bos_token_id=special["<|begin_of_text|>"] if template == "llama3" else None)
    config.dtype = dtype  # recorded in config.json
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
