"""The app's request limits (``app.limits``), checked by the ingress before any stage is called.

Values of the engines' params are checked by the params themselves (``SamplingParams`` /
``DiffusionParams``, built once from the request); what is checked here is what one app allows
(``max_tokens`` up to ``limits.max_tokens``, ``n``, stop strings, pixels, steps, images), on the
typed params, including each pipeline step's own ``stage_args``.
"""

from __future__ import annotations

from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.config import LimitsConfig, PipelineConfig
from omni_ray.errors import InvalidRequestError
from omni_ray.rules import check_prompt_tokens
from omni_ray.runner import StageArgs


def _check_stop(stop: list[str] | None, limits: LimitsConfig, param: str = "stop") -> None:
    if stop and len(stop) > limits.max_stop_sequences:
        raise InvalidRequestError(f"at most {limits.max_stop_sequences} stop sequences", param=param)


def _check_max_tokens(max_new: int | None, limits: LimitsConfig, param: str = "max_tokens") -> None:
    if max_new is not None and max_new > limits.max_tokens:
        raise InvalidRequestError(f"max_tokens must be <= {limits.max_tokens}", param=param)


def check_text_limits(body, params: SamplingParams, limits: LimitsConfig) -> None:
    """A completion / chat request (``params``: its SamplingParams) against the limits; token
    counts of text prompts are checked by the AR stage right after tokenizing."""
    if body.n > limits.max_n:
        raise InvalidRequestError(f"n must be <= {limits.max_n}", param="n")
    _check_max_tokens(params.max_tokens, limits)
    _check_max_tokens(body.max_tokens, limits)       # also where max_completion_tokens overrides it
    _check_stop(params.stop, limits)
    if hasattr(body, "prompts"):
        prompts = body.prompts()
        if len(prompts) > limits.max_prompts:
            raise InvalidRequestError(f"at most {limits.max_prompts} prompts per request", param="prompt")
        for p in prompts:
            if isinstance(p, list):
                check_prompt_tokens(len(p), limits.max_prompt_tokens)


def check_image_limits(args: dict, limits: LimitsConfig, prefix: str = "") -> None:
    h, w = args.get("height"), args.get("width")
    if h and w and h * w > limits.max_image_pixels:
        raise InvalidRequestError(f"size {w}x{h} exceeds {limits.max_image_pixels} pixels", param=f"{prefix}size")
    if (args.get("num_inference_steps") or 0) > limits.max_steps:
        raise InvalidRequestError(f"num_inference_steps must be <= {limits.max_steps}",
                                  param=f"{prefix}num_inference_steps")
    if (args.get("num_images_per_prompt") or 1) > limits.max_images:
        raise InvalidRequestError(f"n must be <= {limits.max_images}", param=f"{prefix}n")


def check_pipeline_limits(name: str, pipe: PipelineConfig, kinds: dict[str, str], args: StageArgs,
                          limits: LimitsConfig) -> None:
    """Validate ``args`` (``StageArgs.validate``: every step's typed params built, once) and check
    the request-wide arguments (whether or not the pipeline has a step that uses them: a limit is a
    limit) and every step's effective params, overrides included."""
    args.validate(name, pipe, kinds)
    _check_max_tokens(args.text.get("max_tokens"), limits)
    _check_stop(args.text.get("stop"), limits)
    check_image_limits(args.image, limits)
    for i, step in enumerate(pipe.steps):
        kind = kinds[step.stage]
        prefix = f"stage_args.{step.stage}." if step.stage in args.per_stage else ""
        params, _ = args.params_for(i, step, kind)
        if kind == "ar":
            _check_max_tokens(params.max_tokens, limits, prefix + "max_tokens")
            _check_stop(params.stop, limits, prefix + "stop")
        else:
            check_image_limits(vars(params), limits, prefix)
