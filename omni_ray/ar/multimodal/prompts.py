"""Prompts with media, in the shapes users give them, made into ``MultiModalInputs``.

- vLLM's offline form: ``{"prompt": text, "multi_modal_data": {"image": PIL image or list,
  "audio": (array, sample_rate) or list}}``; ``text`` carries the model's placeholder tokens
  (what its chat template writes for an image / audio part).
- Chat messages with OpenAI content parts: ``{"type": "image_url", "image_url": {"url":
  "data:image/png;base64,..."}}``, ``{"type": "input_audio", "input_audio": {"data": base64,
  "format": "wav"}}``, and offline ``{"type": "image", "image": PIL}`` / ``{"type": "audio",
  "audio": (array, rate)}``; rendered by the checkpoint's own chat template.

Every piece of media goes through ``omni_ray.media`` (limits, no fetch unless configured) and each
refusal names the request field it came from.
"""

from __future__ import annotations

from typing import Any

from omni_ray.ar.multimodal.inputs import MultiModalInputs
from omni_ray.ar.multimodal.processor import MultiModalProcessor
from omni_ray.config import MediaConfig
from omni_ray.errors import InvalidRequestError
from omni_ray.media import load_audio, load_image

IMAGE_PARTS = ("image_url", "image")
AUDIO_PARTS = ("input_audio", "audio")


def _as_list(x) -> list:
    return list(x) if isinstance(x, list) else [x]


def _check_count(n: int, cfg: MediaConfig, param: str) -> None:
    if n > cfg.max_items:
        raise InvalidRequestError(f"{param}: {n} images / audio clips; the limit is app.media.max_items = "
                                  f"{cfg.max_items}", param=param)


def has_media(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") in
                                                           IMAGE_PARTS + AUDIO_PARTS for p in m["content"])
               for m in messages)


def _image_ref(part: dict, param: str):
    value = part.get(part["type"])
    if part["type"] == "image_url":
        value = value.get("url") if isinstance(value, dict) else value
    if value is None:
        raise InvalidRequestError(f"{param}: missing the image", param=param)
    return value


def _audio(part: dict, param: str, cfg: MediaConfig, rate: int):
    value = part.get(part["type"])
    if part["type"] == "input_audio":
        if not isinstance(value, dict) or not isinstance(value.get("data"), str):
            raise InvalidRequestError(f"{param}: input_audio needs 'data' (base64) and 'format'", param=param)
        return load_audio(value["data"], f"{param}.data", cfg, rate, fmt=value.get("format"))
    return load_audio(value, param, cfg, rate)


def split_chat(messages: list[dict], cfg: MediaConfig, sampling_rate: int) -> tuple[list[dict], list, list]:
    """(messages for the chat template, images, audio clips) in prompt order."""
    out, images, audios = [], [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            param = f"messages.{i}.content.{j}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in IMAGE_PARTS:
                images.append(load_image(_image_ref(part, param), f"{param}.{kind}", cfg))
                parts.append({"type": "image"})
            elif kind in AUDIO_PARTS:
                audios.append(_audio(part, f"{param}.{kind}", cfg, sampling_rate))
                parts.append({"type": "audio"})
            else:
                raise InvalidRequestError(f"{param}: content part type {kind!r} is not supported (text, "
                                          "image_url, input_audio)", param=param)
        out.append({**m, "content": parts})
    _check_count(len(images) + len(audios), cfg, "messages")
    return out, images, audios


def chat_inputs(proc: MultiModalProcessor, messages: list[dict], cfg: MediaConfig,
                **template_kw: Any) -> MultiModalInputs:
    """Chat messages with media parts -> a processed prompt (the checkpoint's chat template)."""
    if proc.audio_token is None and any(isinstance(m.get("content"), list) and any(
            isinstance(p, dict) and p.get("type") in AUDIO_PARTS for p in m["content"]) for m in messages):
        raise InvalidRequestError("this model does not take audio input", param="messages")
    msgs, images, audios = split_chat(messages, cfg, proc.sampling_rate)
    try:
        text = proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **template_kw)
    except Exception as err:  # template errors (e.g. role order) are the caller's fault
        raise InvalidRequestError(f"chat template failed: {err}", param="messages") from None
    return proc(text, images=images, audios=audios)


def data_inputs(proc: MultiModalProcessor, prompt: str, data: dict, cfg: MediaConfig) -> MultiModalInputs:
    """vLLM's ``{"prompt": text, "multi_modal_data": {...}}`` -> a processed prompt."""
    if not isinstance(prompt, str):
        raise InvalidRequestError("a prompt with multi_modal_data must be text with the model's placeholder "
                                  "tokens", param="prompt")
    unknown = sorted(set(data) - {"image", "audio"})
    if unknown:
        raise InvalidRequestError(f"multi_modal_data: {unknown} not supported (image, audio)",
                                  param="multi_modal_data")
    images = [load_image(x, f"multi_modal_data.image.{i}", cfg) for i, x in enumerate(_as_list(data.get("image", [])))]
    audio = data.get("audio", [])
    clips = [audio] if isinstance(audio, tuple) else _as_list(audio)
    audios = [load_audio(x, f"multi_modal_data.audio.{i}", cfg, proc.sampling_rate) for i, x in enumerate(clips)]
    _check_count(len(images) + len(audios), cfg, "multi_modal_data")
    return proc(prompt, images=images, audios=audios, add_special_tokens=True)
