"""Request validation: everything a request can get wrong raises InvalidRequestError (HTTP 400,
naming the parameter) before the engine does any work for it."""

from __future__ import annotations

import os
import uuid

import torch

from omni_ray.config import DiTEngineConfig
from omni_ray.dit.families.base import DiTFamily
from omni_ray.dit.params import DiffusionParams
from omni_ray.dit.request import DiTRequest
from omni_ray.errors import InvalidRequestError
from omni_ray.rules import check_text

OUTPUT_TYPES = ("pil", "np", "latent")


def _bad(param: str, msg: str):
    raise InvalidRequestError(msg, param=param)


def build_request(fam: DiTFamily, cfg: DiTEngineConfig, prompt, params: DiffusionParams | None,
                  request_id: str | None, prompt_embeds, prompt_mask, output_type: str,
                  negative_prompt_embeds=None, negative_prompt_mask=None, image=None) -> DiTRequest:
    """A validated request with the family's defaults filled in."""
    params = params if params is not None else DiffusionParams()
    if not isinstance(params, DiffusionParams):
        _bad("params", f"params must be DiffusionParams, got {type(params).__name__}")
    params.validate()
    embeds, mask = check_conditioning(fam, cfg.model.served_name, prompt, prompt_embeds, prompt_mask)
    neg_embeds, neg_mask = check_negative(fam, negative_prompt_embeds, negative_prompt_mask)
    default_h, default_w = fam.default_hw
    if cfg.default_size is not None:
        default_w, default_h = (int(v) for v in cfg.default_size.split("x"))
    if image is not None:
        default_h, default_w = fit_pixels(*fam.check_image(image), cfg.max_pixels, fam.stride)  # param="image"
    elif fam.accepts_image:
        _bad("image", "this model takes an input image: pass image=")
    h = params.height or default_h
    w = params.width or default_w
    for name, v in (("height", h), ("width", w)):
        if v % fam.stride:
            _bad(name, f"{name} must be a multiple of {fam.stride} (VAE scale x patch size), got {v}")
        if fam.max_size is not None and v > fam.max_size:
            _bad(name, f"{name} must be at most {fam.max_size} for this model, got {v}")
    if h * w > cfg.max_pixels:
        _bad("size", f"{h}x{w} = {h * w} pixels exceeds the limit of {cfg.max_pixels}")
    steps = params.num_inference_steps or cfg.default_steps or fam.default_steps
    if steps > cfg.max_steps:
        _bad("num_inference_steps", f"num_inference_steps must be at most {cfg.max_steps}, got {steps}")
    n, n_max = params.num_images_per_prompt, min(cfg.max_images_per_prompt, cfg.max_batch_size)
    if n > n_max:
        _bad("num_images_per_prompt", f"num_images_per_prompt must be at most {n_max}, got {n}")
    if params.negative_prompt and not fam.has_text_encoder and neg_embeds is None:
        _bad("negative_prompt", "this model has no text encoder, so it cannot take a negative_prompt"
             + (f" as text ({fam.text_encoder_note}); pass negative_prompt_embeds" if fam.text_encoder_note else ""))
    if output_type not in OUTPUT_TYPES:
        _bad("output_type", f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    num_frames = fam.check_num_frames(params.num_frames, cfg)
    g = fam.default_guidance if params.guidance_scale is None else float(params.guidance_scale)
    has_negative = neg_embeds is not None or params.negative_prompt is not None
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return DiTRequest(
        request_id=request_id or uuid.uuid4().hex, prompt=prompt, height=h, width=w, num_steps=steps,
        guidance_scale=g, seed=seed, num_images=n, negative_prompt=params.negative_prompt or "",
        cache=params.step_cache, prompt_embeds=embeds, prompt_mask=mask, output_type=output_type,
        negative_prompt_embeds=neg_embeds, negative_prompt_mask=neg_mask, image=image,
        cfg=fam.cfg_enabled(g, has_negative), num_frames=num_frames, boundary=fam.boundary_timestep)


def fit_pixels(h: int, w: int, max_pixels: int, stride: int) -> tuple[int, int]:
    """(h, w) scaled down at its aspect ratio to at most ``max_pixels``, multiples of ``stride``."""
    if h * w <= max_pixels:
        return h, w
    scale = (max_pixels / (h * w)) ** 0.5
    return max(stride, int(h * scale) // stride * stride), max(stride, int(w * scale) // stride * stride)


def check_negative(fam: DiTFamily, embeds, mask):
    """A request's ``negative_prompt_embeds`` / ``negative_prompt_mask`` after the checks of the positive ones."""
    if embeds is None:
        if mask is not None:
            _bad("negative_prompt_mask", "negative_prompt_mask was given without negative_prompt_embeds")
        return None, None
    return check_embeds(fam, embeds, mask, "negative_prompt_embeds", "negative_prompt_mask")


def check_conditioning(fam: DiTFamily, model_name: str, prompt, embeds, mask):
    """(embeds [T, W], mask [T] or None) after checks; (None, None) when the text encoder is used."""
    if embeds is None:
        if mask is not None:
            _bad("prompt_mask", "prompt_mask was given without prompt_embeds")
        if not fam.has_text_encoder:
            note = f" ({fam.text_encoder_note})" if fam.text_encoder_note else ""
            _bad("prompt_embeds", f"model {model_name!r} has no text encoder{note}: pass prompt_embeds "
                 f"[T, {fam.caption_dim}] (e.g. the AR stage's prompt hidden states)")
        check_text(prompt)
        if not prompt.strip():
            _bad("prompt", "prompt is blank (whitespace only): the text encoder needs words")
        return None, None
    if prompt is not None and not isinstance(prompt, str):
        _bad("prompt", "prompt must be a string or None")
    return check_embeds(fam, embeds, mask)


def check_embeds(fam: DiTFamily, embeds, mask, e: str = "prompt_embeds", m: str = "prompt_mask"):
    """(embeds [T, W], mask [T] or None) after the shape / value checks."""
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        _bad(e, f"{e} must be a floating-point torch.Tensor [T, H]")
    if embeds.dim() == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.dim() != 2 or embeds.shape[0] < 1:
        _bad(e, f"{e} must have shape [T, H], got {list(embeds.shape)}")
    if embeds.shape[1] != fam.caption_dim:
        _bad(e, f"{e} hidden size is {embeds.shape[1]}; this model takes "
             f"{fam.caption_dim}")
    limit = fam.max_embed_tokens
    if embeds.shape[0] > limit:
        _bad(e, f"{e} has {embeds.shape[0]} tokens; the limit is {limit}")
    if not bool(torch.isfinite(embeds).all()):
        _bad(e, f"{e} contains NaN or infinite values")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            _bad(m, f"{m} must be a torch.Tensor [T]")
        if mask.dim() == 2 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.shape != embeds.shape[:1]:
            _bad(m, f"{m} must have shape [{embeds.shape[0]}], got {list(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()) or not bool(mask.any()):
            _bad(m, f"{m} must hold 0/1 values with at least one 1")
        mask = mask.long()
    try:
        fam.check_embeds(embeds, mask)
    except InvalidRequestError as err:
        if e == "prompt_embeds":
            raise
        raise InvalidRequestError(f"{e}: {err.message}", param=e if err.param == "prompt_embeds" else m) from None
    return embeds.detach(), mask
