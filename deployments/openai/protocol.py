"""OpenAI-compatible request bodies (pydantic) and their translation into stage requests.

Unknown fields are ignored (clients send many); known fields are range-checked here and any
pydantic error becomes a 400 with OpenAI's error body. Fields OpenAI defines that omni-ray
cannot honour (``echo``, penalties, tools, ``response_format: url``) are rejected with 400
rather than silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from omni_ray.config import LimitsConfig
from omni_ray.errors import InvalidRequestError

Priority = Literal["high", "normal", "low"]


class _Body(BaseModel):
    """Unknown fields are ignored; known ones are strict (no ``false`` as a token id, no ``1.0`` as
    ``n``, no ``"2"`` as ``max_tokens``): a value of the wrong JSON type is a 400."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data: Any) -> Any:
        bad = _first_non_utf8(data)
        if bad is not None:
            raise ValueError(f"{bad or 'value'}: text must be valid Unicode (a lone surrogate was sent)")
        return data


def _first_non_utf8(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) in ``value`` that cannot be UTF-8 encoded
    (JSON allows lone surrogates like "\\ud800"; tokenizers do not), else None."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return p
        elif isinstance(v, dict):
            stack.extend((k, p) for k in v if isinstance(k, str))
            stack.extend((x, f"{p}.{k}" if p else str(k)) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, f"{p}.{i}") for i, x in enumerate(v))
    return None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)                    # extension
    min_p: float = Field(0.0, ge=0.0, le=1.0)        # extension
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    ignore_eos: bool = False                         # extension
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    priority: Priority = "normal"                    # extension: the omni scheduler's class
    user: str | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("penalties are not supported (must be 0)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        return [v] if isinstance(v, str) else v

    def sampling(self, max_tokens: int | None, logprobs: bool) -> dict:
        """kwargs for SamplingParams; max_tokens None = fill the context (resolved by the AR stage)."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    max_tokens=max_tokens, ignore_eos=self.ignore_eos, stop=self.stop, seed=self.seed,
                    logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)         # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=0)   # only the chosen token's logprob is returned
    echo: bool = False
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if not p:
            raise InvalidRequestError("prompt is empty", param="prompt")
        return list(p)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise InvalidRequestError(f"content part type {part.get('type')!r} is not supported",
                                          param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)  # only the chosen token's logprob
    tools: list | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported")
        return v

    def chat_messages(self) -> list[dict]:
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text()})
        return out

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (height, width)."""
    if size is None or size == "auto":
        return None, None
    m = _SIZE.match(size)
    if not m:
        raise InvalidRequestError(f"size must look like '512x512' (WxH), got {size!r}", param="size")
    w, h = int(m.group(1)), int(m.group(2))
    if w < 8 or h < 8 or w % 8 or h % 8:
        raise InvalidRequestError(f"size {size!r}: width and height must be multiples of 8, >= 8", param="size")
    return h, w


class _ImageArgs(_Body):
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    num_inference_steps: int | None = Field(None, ge=1)   # extensions below
    guidance_scale: float | None = Field(None, ge=0.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    negative_prompt: str | None = None
    cache: bool | str | dict | None = None

    @field_validator("response_format")
    @classmethod
    def _b64_only(cls, v: str) -> str:
        if v == "url":
            raise ValueError("response_format 'url' is not supported; use 'b64_json'")
        return v

    def diffusion(self) -> dict:
        """kwargs for DiffusionParams (None = the engine's default)."""
        h, w = parse_size(self.size)
        kw = dict(height=h, width=w, num_inference_steps=self.num_inference_steps,
                  guidance_scale=self.guidance_scale, seed=self.seed, negative_prompt=self.negative_prompt,
                  num_images_per_prompt=self.n, cache=self.cache)
        return {k: v for k, v in kw.items() if v is not None}


class ImageGenerationRequest(_ImageArgs):
    prompt: str = Field(min_length=1)
    model: str | None = None
    priority: Priority = "normal"
    quality: str | None = None
    style: str | None = None
    user: str | None = None


class PipelineRequest(_ImageArgs):
    """``POST /v1/pipelines/{name}``: one prompt through every step of a pipeline.

    Text fields apply to AR steps, image fields to DiT steps; ``stage_args`` overrides per stage
    key (e.g. ``{"llm": {"max_tokens": 32}}``)."""

    pipeline: str | None = None                     # for /v1/pipelines/run
    prompt: str = Field(min_length=1)
    stream: bool = False
    priority: Priority = "normal"
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stage_args: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def text_args(self) -> dict:
        kw = dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                  stop=[self.stop] if isinstance(self.stop, str) else self.stop)
        return {k: v for k, v in kw.items() if v is not None}


class GenerateRequest(PipelineRequest):
    """``POST /generate`` (vLLM-omni's API server): a prompt, an optional ``pipeline`` (default:
    ``default``, else the only one) and per-stage args, either by stage key (as
    ``/v1/pipelines/{name}``) or as a list with one dict per step (vLLM-omni's ``stage_args``)."""

    stage_args: dict[str, dict[str, Any]] | list[dict[str, Any]] = Field(default_factory=dict)

    def to_pipeline(self, pipelines: dict) -> tuple[str, PipelineRequest]:
        """(pipeline name, the equivalent ``/v1/pipelines/{name}`` body)."""
        name = self.pipeline or ("default" if "default" in pipelines or len(pipelines) != 1 else next(iter(pipelines)))
        if name not in pipelines:
            raise InvalidRequestError(f"POST /generate needs a 'pipeline' field; pipelines: {sorted(pipelines)}",
                                      param="pipeline")
        per_stage = self.stage_args
        if isinstance(per_stage, list):
            steps = pipelines[name].steps
            if len(per_stage) != len(steps):
                raise InvalidRequestError(f"stage_args has {len(per_stage)} entries; pipeline {name!r} has "
                                          f"{len(steps)} steps", param="stage_args")
            per_stage = {}
            for i, (step, raw) in enumerate(zip(steps, self.stage_args)):
                raw = dict(raw)
                if raw.pop("prompt", self.prompt) != self.prompt:
                    raise InvalidRequestError(f"stage_args.{i}.prompt: a later step takes the previous step's "
                                              "output; only the request's prompt can be set",
                                              param=f"stage_args.{i}.prompt")
                per_stage.setdefault(step.stage, {}).update(raw)
        body = PipelineRequest.model_validate(self.model_dump(exclude={"stage_args"}) | {"stage_args": per_stage},
                                              strict=False)
        return name, body


# ----------------------------------------------------------------------------- per-stage overrides
class ARStageArgs(_Body):
    """``stage_args`` of an AR step: SamplingParams fields plus the step's system prompt / layer."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    ignore_eos: bool | None = None
    logprobs: bool | None = None
    system_prompt: str | None = None
    layer: int | None = None


class DiTStageArgs(_Body):
    """``stage_args`` of a DiT step: DiffusionParams fields (``size`` "WxH" or height/width)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | None = None
    size: str | None = None
    height: int | None = Field(None, ge=8, multiple_of=8)
    width: int | None = Field(None, ge=8, multiple_of=8)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    negative_prompt: str | None = None
    num_images_per_prompt: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    cache: bool | str | dict | None = None


def stage_kwargs(kind: str, raw: dict, prefix: str = "") -> dict:
    """Validate stage arguments (one stage's overrides, or the request-wide text / image ones) into
    plain kwargs; errors name ``<prefix><field>``."""
    from pydantic import ValidationError

    cls = ARStageArgs if kind == "ar" else DiTStageArgs
    try:
        m = cls.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = prefix + ".".join(str(p) for p in e["loc"])
        raise InvalidRequestError(f"{loc}: {e['msg']}", param=loc or None) from None
    out = m.model_dump(exclude_none=True)
    if kind == "ar":
        if isinstance(out.get("stop"), str):
            out["stop"] = [out["stop"]]
        return out
    if "size" in out:
        out["height"], out["width"] = parse_size(out.pop("size"))
    if "n" in out:
        out["num_images_per_prompt"] = out.pop("n")
    return out


# ----------------------------------------------------------------------------- limits
def _check_stop(stop: list[str] | None, limits: LimitsConfig, param: str = "stop") -> None:
    if stop and len(stop) > limits.max_stop_sequences:
        raise InvalidRequestError(f"at most {limits.max_stop_sequences} stop sequences", param=param)


def _check_max_tokens(max_new: int | None, limits: LimitsConfig, param: str = "max_tokens") -> None:
    if max_new is not None and max_new > limits.max_tokens:
        raise InvalidRequestError(f"max_tokens must be <= {limits.max_tokens}", param=param)


def check_text_limits(req: _Sampling, max_new: int | None, limits: LimitsConfig) -> None:
    """Ingress-side limits of a completion / chat request (token counts of text prompts are
    checked by the AR replica right after tokenizing, before the engine sees the request)."""
    if req.n > limits.max_n:
        raise InvalidRequestError(f"n must be <= {limits.max_n}", param="n")
    _check_max_tokens(max_new, limits)
    _check_max_tokens(req.max_tokens, limits)       # also where max_completion_tokens overrides it
    _check_stop(req.stop, limits)
    if isinstance(req, CompletionRequest):
        prompts = req.prompts()
        if len(prompts) > limits.max_prompts:
            raise InvalidRequestError(f"at most {limits.max_prompts} prompts per request", param="prompt")
        for p in prompts:
            if isinstance(p, list) and len(p) > limits.max_prompt_tokens:
                raise InvalidRequestError(f"prompt has {len(p)} tokens; the limit is {limits.max_prompt_tokens}",
                                          param="prompt")


def check_image_limits(args: dict, limits: LimitsConfig, prefix: str = "") -> None:
    h, w = args.get("height"), args.get("width")
    if h and w and h * w > limits.max_image_pixels:
        raise InvalidRequestError(f"size {w}x{h} exceeds {limits.max_image_pixels} pixels", param=f"{prefix}size")
    if (args.get("num_inference_steps") or 0) > limits.max_steps:
        raise InvalidRequestError(f"num_inference_steps must be <= {limits.max_steps}",
                                  param=f"{prefix}num_inference_steps")
    if (args.get("num_images_per_prompt") or 1) > limits.max_images:
        raise InvalidRequestError(f"n must be <= {limits.max_images}", param=f"{prefix}n")


def check_pipeline_limits(name: str, pipe, kinds: dict[str, str], args, limits: LimitsConfig) -> None:
    """Validate ``args.per_stage`` (replaced by the validated kwargs) and check the request-wide
    arguments (whether or not the pipeline has a step that uses them: a limit is a limit) and every
    step's effective arguments, overrides included, against the limits."""
    if not isinstance(args.per_stage, dict):
        raise InvalidRequestError("stage_args must be an object {stage: {...}}", param="stage_args")
    steps = {s.stage for s in pipe.steps}
    unknown = set(args.per_stage) - steps
    if unknown:
        raise InvalidRequestError(f"stage_args names stages not in pipeline {name!r}: {sorted(unknown)}",
                                  param="stage_args")
    args.text, args.image = stage_kwargs("ar", args.text), stage_kwargs("dit", args.image)
    _check_max_tokens(args.text.get("max_tokens"), limits)
    _check_stop(args.text.get("stop"), limits)
    check_image_limits(args.image, limits)
    for stage, raw in list(args.per_stage.items()):
        if not isinstance(raw, dict):
            raise InvalidRequestError(f"stage_args.{stage} must be an object", param=f"stage_args.{stage}")
        args.per_stage[stage] = stage_kwargs(kinds[stage], raw, f"stage_args.{stage}.")
    for step in pipe.steps:
        kind = kinds[step.stage]
        eff = args.for_step(step, kind)
        prefix = f"stage_args.{step.stage}." if step.stage in args.per_stage else ""
        if kind == "ar":
            _check_max_tokens(eff.get("max_tokens"), limits, prefix + "max_tokens")
            _check_stop(eff.get("stop"), limits, prefix + "stop")
        else:
            check_image_limits(eff, limits, prefix)
