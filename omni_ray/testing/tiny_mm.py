"""Tiny multimodal checkpoints: ``tiny:qwen2.5-vl`` and ``tiny:qwen2.5-omni``.

Built from transformers' own config and model classes (``Qwen2_5_VLForConditionalGeneration``,
``Qwen2_5OmniForConditionalGeneration``: thinker, talker and token2wav), scaled down, seeded, and
written with ``save_pretrained`` together with a tokenizer that holds the models' placeholder
tokens (at the ids the config names) and processor files, so that
``AutoProcessor.from_pretrained(dir)`` turns PIL images / numpy audio into model inputs.

The image processor written is the PIL backend (``Qwen2VLImageProcessorPil``: no torchvision
needed); no video processor is written (transformers' Qwen2-VL video processor needs torchvision).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from omni_ray.testing.tokenizer import save_tokenizer

VERSION = "1"       # in the cache key: 1 = the Omni thinker_config names its vision start / end tokens

# a ChatML template that renders list-valued contents: text, image, video and audio parts
_MM_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}{{ '@IMAGE@' }}"
    "{% elif part['type'] == 'video' or 'video' in part %}{{ '@VIDEO@' }}"
    "{% elif part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}{{ '@AUDIO@' }}"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def mm_template(image: str, video: str, audio: str | None) -> str:
    """The template with its placeholder strings (audio parts render to nothing without ``audio``)."""
    return (_MM_TEMPLATE.replace("@IMAGE@", image).replace("@VIDEO@", video)
            .replace("@AUDIO@", audio or ""))


# Qwen2.5-VL's placeholder tokens (real ids: 151652..151656)
VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2.5-Omni's (real ids: <|AUDIO|> 151646, <|audio_bos|> 151647, <|audio_eos|> 151648,
# <|vision_bos|> 151652, <|vision_eos|> 151653, <|vision_pad|> 151654, <|IMAGE|> 151655, <|VIDEO|> 151656)
OMNI_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>",
               "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>")
OMNI_NAMED = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
              "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
              "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}

# tiny towers (real ones: Qwen2.5-VL-7B vision depth 32, hidden 1280, window 112; Omni audio 32 layers, d_model 1280)
TINY_VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
TINY_TEXT = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0})
TINY_AUDIO = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                  n_window=8, max_source_positions=64)
# processor limits: images of at most 64 merged tokens (256 patches)
TINY_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 64 * 28 * 28}


def build_qwen2_5_vl(out: Path, seed: int = 0) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    template = mm_template("<|vision_start|><|image_pad|><|vision_end|>",
                           "<|vision_start|><|video_pad|><|vision_end|>", None)
    ids = save_tokenizer(out, "chatml", extra_special=VL_TOKENS, chat_template=template)
    text = dict(TINY_TEXT, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    config = Qwen2_5_VLConfig(
        vision_config=dict(TINY_VISION, out_hidden_size=text["hidden_size"]), text_config=text,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    _save_model(out, Qwen2_5_VLForConditionalGeneration, config, seed)
    _save_processor(out, "Qwen2_5_VLProcessor", template)


def build_qwen2_5_omni(out: Path, seed: int = 0) -> None:
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

    template = mm_template("<|vision_bos|><|IMAGE|><|vision_eos|>", "<|vision_bos|><|VIDEO|><|vision_eos|>",
                           "<|audio_bos|><|AUDIO|><|audio_eos|>")
    ids = save_tokenizer(out, "chatml", extra_special=OMNI_TOKENS, named_tokens=OMNI_NAMED, chat_template=template)
    hidden = TINY_TEXT["hidden_size"]
    mm_ids = dict(audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
                  video_token_index=ids["<|VIDEO|>"], audio_start_token_id=ids["<|audio_bos|>"],
                  audio_end_token_id=ids["<|audio_eos|>"])
    # the hub thinker_config names its vision start / end tokens too (transformers' get_rope_index reads them)
    thinker = dict(audio_config=dict(TINY_AUDIO, output_dim=hidden),
                   vision_config=dict(TINY_VISION, out_hidden_size=hidden),
                   text_config=dict(TINY_TEXT, tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"],
                                    pad_token_id=ids["<|endoftext|>"]),
                   vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"], **mm_ids)
    codec = 64  # talker's codec vocabulary; its last four ids are the codec's special tokens
    talker = dict(vocab_size=codec, embedding_size=hidden, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  rope_parameters=dict(TINY_TEXT["rope_parameters"], mrope_section=[2, 3, 3]),
                  tts_codec_start_token_id=codec - 4, tts_codec_end_token_id=codec - 3,
                  tts_codec_pad_token_id=codec - 2, tts_codec_mask_token_id=codec - 1,
                  tts_text_start_token_id=ids["<|im_start|>"], tts_text_end_token_id=ids["<|im_end|>"],
                  tts_text_pad_token_id=ids["<|endoftext|>"],
                  vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"], **mm_ids)
    dit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ff_mult=2, emb_dim=16, head_dim=16,
               look_ahead_layers=[1], look_backward_layers=[0], num_embeds=codec, mel_dim=80, enc_emb_dim=16,
               enc_dim=16, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8, enc_se_channels=8)
    bigvgan = dict(mel_dim=80, upsample_initial_channel=128, resblock_kernel_sizes=[3],
                   resblock_dilation_sizes=[[1, 3, 5]],
                   upsample_rates=[5, 3, 2, 2, 2, 2], upsample_kernel_sizes=[11, 7, 4, 4, 4, 4])
    config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker,
                               token2wav_config=dict(dit_config=dit, bigvgan_config=bigvgan))
    _save_model(out, Qwen2_5OmniForConditionalGeneration, config, seed)
    _save_speakers(out, dit, ids["<|im_start|>"], seed)
    fe = WhisperFeatureExtractor(feature_size=TINY_AUDIO["num_mel_bins"], sampling_rate=16000, hop_length=160,
                                 chunk_length=30, n_fft=400, return_attention_mask=True)
    _save_processor(out, "Qwen2_5OmniProcessor", template, feature_extractor=fe)


def _save_model(out: Path, cls, config, seed: int) -> None:
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = cls(config).eval()
    _spread_encoder_weights(model, seed)
    model.save_pretrained(out, safe_serialization=True)


def _spread_encoder_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw the vision/audio towers' parameters: matrices with std 1/sqrt(fan_in) (sharp attention,
    activations of order one), biases around 0 and norm weights around 1 with std 0.1. transformers'
    init (std 0.02, zero biases, unit norms) would leave bias and norm mix-ups invisible to tests."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual." not in name and "audio_tower." not in name:
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                centre = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=g))


def _save_speakers(out: Path, dit: dict, bos_token: int, seed: int) -> None:
    """``spk_dict.pt`` as the hub checkpoint has it (transformers' Omni ``from_pretrained`` requires it):
    per speaker a conditioning vector [1, enc_emb_dim], a reference mel [1, frames, mel_dim] and the
    talker's text-start token. Plain tensors and ints (loads with ``torch.load(weights_only=True)``)."""
    g = torch.Generator().manual_seed(seed)
    spk = {name: {"cond": torch.randn(1, dit["enc_emb_dim"], generator=g),
                  "ref_mel": torch.randn(1, 30, dit["mel_dim"], generator=g), "bos_token": bos_token}
           for name in ("Chelsie", "Ethan")}
    torch.save(spk, out / "spk_dict.pt")


def _image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size=dict(TINY_PIXELS), patch_size=TINY_VISION["patch_size"],
                                    temporal_patch_size=TINY_VISION["temporal_patch_size"],
                                    merge_size=TINY_VISION["spatial_merge_size"])


def _save_processor(out: Path, processor_class: str, template: str, feature_extractor=None) -> None:
    """Processor files in the hub checkpoints' layout: one ``preprocessor_config.json`` with the image
    processor's (and the feature extractor's) fields and ``processor_class``, and the chat template.
    Written by hand: transformers' Qwen2.5 processors cannot be built without torchvision (their
    video processor needs it), so ``processor.save_pretrained`` is out of reach here."""
    cfg = _image_processor().to_dict()
    if feature_extractor is not None:
        cfg.update(feature_extractor.to_dict())
    cfg.pop("_processor_class", None)
    cfg["processor_class"] = processor_class
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "chat_template.jinja").write_text(template)


TINY_MM = {"qwen2.5-vl": build_qwen2_5_vl, "qwen2.5-omni": build_qwen2_5_omni}

# Qwen2.5-VL-7B-Instruct's config.json and preprocessor_config.json values (benchmarks: random bf16 weights)
VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                    tokens_per_second=2, out_hidden_size=3584)


def build_qwen2_5_vl_7b_shape(out: Path, seed: int = 0) -> None:
    """``shape:qwen2.5-vl-7b``: the real model's dimensions and processor settings, random bf16 weights
    (built on the GPU when there is one), a tokenizer covering the whole vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    template = mm_template("<|vision_start|><|image_pad|><|vision_end|>",
                           "<|vision_start|><|video_pad|><|vision_end|>", None)
    ids = save_tokenizer(out, "chatml", extra_special=VL_TOKENS, chat_template=template,
                         fill_to=VL_7B_TEXT["vocab_size"])
    text = dict(VL_7B_TEXT, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    config = Qwen2_5_VLConfig(vision_config=dict(VL_7B_VISION), text_config=text,
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                              eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    config.dtype = torch.bfloat16
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)
    cfg = proc.to_dict()
    cfg.pop("_processor_class", None)
    cfg["processor_class"] = "Qwen2_5_VLProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "chat_template.jinja").write_text(template)


def build_qwen2_5_omni_7b_shape(out: Path, seed: int = 0) -> None:
    """``shape:qwen2.5-omni-7b``: Qwen2.5-Omni-7B's dimensions (transformers' default ``Qwen2_5OmniConfig``:
    thinker 7B with its vision and audio towers, talker, token2wav), random weights (bf16; token2wav float32, as
    the model runs it) built on the GPU when there is one, a tokenizer covering the whole vocabulary, two voices
    in spk_dict.pt. For benchmarks."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

    template = mm_template("<|vision_bos|><|IMAGE|><|vision_eos|>", "<|vision_bos|><|VIDEO|><|vision_eos|>",
                           "<|audio_bos|><|AUDIO|><|audio_eos|>")
    base = Qwen2_5OmniConfig()
    vocab = base.thinker_config.text_config.vocab_size
    ids = save_tokenizer(out, "chatml", extra_special=OMNI_TOKENS, named_tokens=OMNI_NAMED, chat_template=template,
                         fill_to=vocab)
    mm_ids = dict(audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
                  video_token_index=ids["<|VIDEO|>"], audio_start_token_id=ids["<|audio_bos|>"],
                  audio_end_token_id=ids["<|audio_eos|>"])
    thinker = base.thinker_config.to_dict()
    thinker["text_config"].update(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    thinker.update(vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"], **mm_ids)
    talker = base.talker_config.to_dict()
    talker.update(tts_text_start_token_id=ids["<|im_start|>"], tts_text_end_token_id=ids["<|im_end|>"],
                  tts_text_pad_token_id=ids["<|endoftext|>"], vision_start_token_id=ids["<|vision_bos|>"],
                  vision_end_token_id=ids["<|vision_eos|>"], **mm_ids)
    config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker,
                               token2wav_config=base.token2wav_config.to_dict())
    config.dtype = torch.bfloat16
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    model.token2wav.float()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    dit = base.token2wav_config.dit_config
    g = torch.Generator().manual_seed(seed)
    spk = {name: {"cond": torch.randn(1, dit.enc_emb_dim, generator=g),
                  "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=g), "bos_token": ids["<|im_start|>"]}
           for name in ("Chelsie", "Ethan")}
    torch.save(spk, out / "spk_dict.pt")
    audio = thinker["audio_config"]
    fe = WhisperFeatureExtractor(feature_size=audio["num_mel_bins"], sampling_rate=16000, hop_length=160,
                                 chunk_length=30, n_fft=400, return_attention_mask=True)
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)
    cfg = proc.to_dict() | fe.to_dict()
    cfg.pop("_processor_class", None)
    cfg["processor_class"] = "Qwen2_5OmniProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "chat_template.jinja").write_text(template)


MM_SHAPES = {"qwen2.5-vl-7b": build_qwen2_5_vl_7b_shape, "qwen2.5-omni-7b": build_qwen2_5_omni_7b_shape}
