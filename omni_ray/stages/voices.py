"""The voices of a Qwen2.5-Omni checkpoint (``spk_dict.pt``): read once per path, cheap enough for the
ingress to check a request's ``voice`` before any stage runs.

    speech_voices("/models/Qwen2.5-Omni-7B")       # ["Chelsie", "Ethan"]
    resolve_voice(["Chelsie", "Ethan"], "chelsie")  # "Chelsie" (InvalidRequestError(param="voice") if none)

Each voice in spk_dict.pt holds ``bos_token`` (the thinker-vocabulary token the talker's prompt starts
its reply with), ``cond`` (the speaker vector) and ``ref_mel`` (the reference mel of token2wav). The file
holds plain tensors and ints: ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from omni_ray.errors import ConfigError, InvalidRequestError


@functools.lru_cache(maxsize=16)
def _speaker_dict(path: str) -> dict:
    from omni_ray.testing import resolve_model

    f = Path(resolve_model(path)) / "spk_dict.pt"
    if not f.is_file():
        raise ConfigError(f"{path} has no spk_dict.pt: not a Qwen2.5-Omni checkpoint with speech output")
    voices = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(voices, dict) or not voices:
        raise ConfigError(f"{f}: no voices")
    return voices


def speech_voices(path: str | Path) -> list[str]:
    """The checkpoint's voice names, sorted (cached per path)."""
    return sorted(_speaker_dict(str(path)))


def speaker_bos(path: str | Path, voice: str) -> int:
    """The thinker token id the talker's prompt takes for ``voice`` (its ``bos_token``)."""
    v = _speaker_dict(str(path))[resolve_voice(speech_voices(path), voice)]
    bos = v.get("bos_token") if isinstance(v, dict) else None
    if bos is None:
        raise ConfigError(f"{path}: spk_dict.pt voice {voice!r} has no bos_token")
    return int(bos)


def resolve_voice(voices: list[str], voice) -> str:
    """The checkpoint's name of ``voice``: exact, else the one case-insensitive match (as token2wav resolves it)."""
    if not isinstance(voice, str) or not voice:
        raise InvalidRequestError(f"voice must be a non-empty string, got {voice!r}", param="voice")
    if voice in voices:
        return voice
    match = [v for v in voices if v.lower() == voice.lower()]
    if len(match) == 1:
        return match[0]
    raise InvalidRequestError(f"unknown voice {voice!r}; this model has {sorted(voices)}", param="voice")
