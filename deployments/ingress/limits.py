"""The app's request limits (``app.limits``), checked by the ingress before any stage is called.

Values of the engines' params are checked by the params themselves (``SamplingParams`` /
``DiffusionParams``, built once from the request); what is checked here is what one app allows
(``max_tokens`` up to ``limits.max_tokens``, ``n``, stop strings, pixels, steps, images), on the
typed params, including each pipeline step's own ``stage_args``.
"""

from __future__ import annotations

from omni_ray.config import LimitsConfig, PipelineConfig
from omni_ray.errors import InvalidRequestError
from omni_ray.rules import check_prompt_tokens
from omni_ray.runner import StageArgs


def _check_stop(stop, limits: LimitsConfig, param: str = "stop") -> None:
    """At most ``max_stop_sequences`` (non-empty) stop strings; the message names this app's limit
    and the count sent (the engine's own bounds, and each string's length, are SamplingParams')."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)):
        return                                      # not a list of strings: SamplingParams says so
    n = sum(1 for s in stops if s != "")
    if n > limits.max_stop_sequences:
        raise InvalidRequestError(f"{param} has {n} strings; this server allows at most "
                                  f"{limits.max_stop_sequences} (app.limits.max_stop_sequences)", param=param)


def _check_max_tokens(max_new: int | None, limits: LimitsConfig, param: str = "max_tokens") -> None:
    if max_new is not None and max_new > limits.max_tokens:
        raise InvalidRequestError(f"{param} is {max_new}; this server allows at most {limits.max_tokens} "
                                  "(app.limits.max_tokens)", param=param)


def check_text_limits(body, limits: LimitsConfig) -> None:
    """A completion / chat request body against the app's limits, before its SamplingParams are
    built (so a value over both this app's limit and the engine's bound is told this app's); token
    counts of text prompts are checked by the AR stage right after tokenizing."""
    if body.n > limits.max_n:
        raise InvalidRequestError(f"n is {body.n}; this server allows at most {limits.max_n} (app.limits.max_n)",
                                  param="n")
    _check_max_tokens(getattr(body, "max_completion_tokens", None), limits, "max_completion_tokens")
    _check_max_tokens(body.max_tokens, limits)       # also where max_completion_tokens overrides it
    _check_stop(body.stop, limits)
    if hasattr(body, "prompts"):
        prompts = body.prompts()
        if len(prompts) > limits.max_prompts:
            raise InvalidRequestError(f"prompt has {len(prompts)} prompts; this server allows at most "
                                      f"{limits.max_prompts} per request (app.limits.max_prompts)", param="prompt")
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
    _check_stop(args.text.get("stop"), limits)       # before the params are built: this app's limit first
    for stage, over in args.per_stage.items():
        if isinstance(over, dict):
            _check_stop(over.get("stop"), limits, f"stage_args.{stage}.stop")
    args.validate(name, pipe, kinds)
    _check_max_tokens(args.text.get("max_tokens"), limits)
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
