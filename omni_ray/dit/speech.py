"""Speech requests on the DiT engine (families with ``produces_audio``: Qwen2.5-Omni token2wav).

A speech request carries codec tokens instead of a prompt:

    engine = DiTEngine("/models/Qwen2.5-Omni-7B")              # the Omni checkpoint directory
    wav = engine.generate(params=DiffusionParams(seed=0), speech=SpeechInput(codes, voice="Chelsie"))[0]

``DiffusionParams`` keeps its meaning: ``num_inference_steps`` is the reference's ``num_steps``
(time points of the ODE grid: ``num_steps - 1`` RK4 intervals, 4 transformer forwards each),
``guidance_scale`` the reference's (CFG below 1e-5 is off), ``seed`` the initial noise. Outputs:
one float32 waveform (numpy ``[samples]`` at ``family.sample_rate``) per request, or the mel
``[T_mel, mel_dim]`` with ``output_type="latent"``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from omni_ray.config import DiTEngineConfig
from omni_ray.dit.params import DiffusionParams
from omni_ray.dit.request import DiTRequest
from omni_ray.errors import InvalidRequestError


def _bad(param: str, msg: str):
    raise InvalidRequestError(msg, param=param)


@dataclass
class SpeechInput:
    """What a speech request synthesizes: codec tokens (the talker's output, without its end token)
    in one of the checkpoint's voices. ``noise``: the initial ODE state ``[len(codes) * repeats,
    mel_dim]`` (chunked synthesis passes its window of the stream's noise; None: drawn from the seed)."""

    codes: Any                                   # 1-D LongTensor, or a list of ints
    voice: str | None = None                     # None: the family's default voice
    sway_coefficient: float | None = -1.0        # the reference's time-grid sway (None: a uniform grid)
    noise: torch.Tensor | None = None
    first: bool = False                          # a stream's first window (token2wav_first_window_alone)


OUTPUT_TYPES = ("pil", "np", "latent")           # "pil" / "np": the waveform; "latent": the mel


def build_speech_request(fam, cfg: DiTEngineConfig, prompt, params: DiffusionParams | None, request_id: str | None,
                         speech: SpeechInput, output_type: str) -> DiTRequest:
    """A validated speech request (InvalidRequestError naming the field) with the family's defaults."""
    params = params if params is not None else DiffusionParams()
    if not isinstance(params, DiffusionParams):
        _bad("params", f"params must be DiffusionParams, got {type(params).__name__}")
    params.validate()
    if not isinstance(speech, SpeechInput):
        _bad("speech", f"speech must be a SpeechInput, got {type(speech).__name__}")
    if prompt is not None:
        _bad("prompt", "this model synthesizes speech from codec tokens: give speech=SpeechInput(codes, voice), "
             "no prompt")
    for name in ("height", "width", "num_frames", "negative_prompt"):
        if getattr(params, name) is not None:
            _bad(name, f"{name} does not apply to speech synthesis")
    if params.step_cache is not None:
        _bad("cache", "step caching is not supported for speech synthesis")
    if params.num_images_per_prompt != 1:
        _bad("num_images_per_prompt", "speech synthesis makes one waveform per request")
    if output_type not in OUTPUT_TYPES:
        _bad("output_type", f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    codes = fam.check_codes(speech.codes)                      # param="codes"
    voice = fam.resolve_voice(speech.voice)                    # param="voice"
    frames = codes.shape[0] * fam.repeats
    noise = speech.noise
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            _bad("noise", "noise must be a floating-point torch.Tensor [T_mel, mel_dim]")
        noise = noise.reshape(-1, noise.shape[-1]) if noise.dim() == 3 and noise.shape[0] == 1 else noise
        if tuple(noise.shape) != (frames, fam.mel_dim):
            _bad("noise", f"noise must have shape [{frames}, {fam.mel_dim}] (len(codes) * repeats, mel_dim), "
                 f"got {list(noise.shape)}")
    sway = speech.sway_coefficient
    if sway is not None and (isinstance(sway, bool) or not isinstance(sway, (int, float))):
        _bad("sway_coefficient", f"sway_coefficient must be a number or None, got {sway!r}")
    steps = params.num_inference_steps or cfg.default_steps or fam.default_steps
    if steps < 2:
        _bad("num_inference_steps", "num_inference_steps must be at least 2 (time points of the ODE grid)")
    if steps > cfg.max_steps:
        _bad("num_inference_steps", f"num_inference_steps must be at most {cfg.max_steps}, got {steps}")
    g = fam.default_guidance if params.guidance_scale is None else float(params.guidance_scale)
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    req = DiTRequest(
        request_id=request_id or uuid.uuid4().hex, prompt=None, height=frames, width=fam.mel_dim, num_steps=steps,
        guidance_scale=g, seed=seed, num_images=1, negative_prompt=None, cache=None, output_type=output_type,
        cfg=fam.cfg_enabled(g, False))
    req.speech = SpeechInput(codes, voice, None if sway is None else float(sway), noise, bool(speech.first))
    return req


@torch.no_grad()
def audio_outputs(fam, reqs: list[DiTRequest], batch_size: int) -> int:
    """Set ``r.images`` of finished speech requests: ``[waveform]`` (float32 numpy) or ``[mel]``
    (``"latent"``). Mels of equal length are vocoded together (the vocoder is convolutional: a
    padded batch would change the shorter one's ends). Returns the number of vocoder batches."""
    batches = 0
    groups: dict[int, list[DiTRequest]] = {}
    for r in reqs:
        if r.output_type == "latent":
            r.images = [r.latents[0].float().cpu()]
        else:
            groups.setdefault(r.latents.shape[1], []).append(r)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            waves = fam.decode(torch.cat([r.latents for r in chunk]))       # [B, samples] float32 CPU
            for r, w in zip(chunk, waves):
                r.images = [w.numpy()]
            batches += 1
    return batches
