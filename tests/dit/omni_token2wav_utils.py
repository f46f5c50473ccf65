"""Shared by the token2wav tests: a token2wav checkpoint with spread weights, and transformers' model of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from omni_ray.dit.families.qwen2_5_omni_token2wav import read_weights
from omni_ray.testing import resolve_model


def random_codes(n: int, seed: int) -> torch.Tensor:
    """``n`` speech codes of the tiny checkpoint's codebook, seeded."""
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))


def spread_checkpoint(out: Path, seed: int = 0) -> Path:
    """tiny:qwen2.5-omni's config.json and spk_dict.pt with its ``token2wav.*`` tensors redrawn: matrices
    with std 1/sqrt(fan_in), vectors (biases, the vocoder's log-scale snake parameters) with std 0.1,
    the vocoder's output projection scaled so that the waveform stays off its [-1, 1] clamp. transformers'
    init (std 0.02, zero biases) would leave mix-ups of biases or conditioning columns invisible."""
    src = resolve_model("tiny:qwen2.5-omni")
    out.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "spk_dict.pt"):
        shutil.copy(src / f, out / f)
    from safetensors.torch import save_file

    save_file(_spread_token2wav(src, seed), str(out / "model.safetensors"))
    return out


def spread_omni_checkpoint(out: Path, seed: int = 0) -> Path:
    """The whole tiny:qwen2.5-omni (thinker, talker, tokenizer, processor files) with its ``token2wav.*``
    tensors redrawn as ``spread_checkpoint`` draws them: a speech model whose waveform is not near zero."""
    from safetensors.torch import load_file, save_file

    src = resolve_model("tiny:qwen2.5-omni")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(src / "model.safetensors")) | _spread_token2wav(src, seed)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _spread_token2wav(src: Path, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, v in sorted(read_weights(src, "token2wav.").items()):
        w = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5 if v.ndim >= 2 else 0.1 * torch.randn(
            v.shape, generator=g)
        if k == "code2wav_bigvgan_model.conv_post.weight":
            w = w * 0.003
        tensors["token2wav." + k] = w.contiguous()
    return tensors


def reference_token2wav(path: Path):
    """transformers' ``Qwen2_5OmniToken2WavModel`` (what ``Qwen2_5OmniForConditionalGeneration.token2wav``
    is) with the checkpoint's weights, float32, and the checkpoint's voices."""
    from transformers import Qwen2_5OmniConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel

    cfg = Qwen2_5OmniConfig.from_pretrained(str(path))
    model = Qwen2_5OmniToken2WavModel._from_config(cfg.token2wav_config, attn_implementation="sdpa",
                                                   dtype=torch.float32).eval()
    model.load_state_dict(read_weights(path, "token2wav."))
    voices = torch.load(path / "spk_dict.pt", weights_only=True)
    return model, voices


@torch.no_grad()
def reference_speech(model, voices, codes: torch.Tensor, voice: str, seed: int, num_steps: int,
                     guidance_scale: float = 0.5, sway: float = -1.0):
    """(mel [T, 80], waveform [samples]) of one ``model.token2wav(...)`` call (the mel: the vocoder's
    input, caught by a hook), the noise drawn after ``torch.manual_seed(seed)`` (as ``generate`` draws
    it from the global generator)."""
    v = voices[voice]
    seen = []
    hook = model.code2wav_bigvgan_model.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        torch.manual_seed(seed)
        wav = model(codes[None], conditioning=v["cond"].float(), reference_mel=v["ref_mel"].float(),
                    num_steps=num_steps, guidance_scale=guidance_scale, sway_coefficient=sway)
    finally:
        hook.remove()
    return seen[0][0].T, wav.reshape(-1)
