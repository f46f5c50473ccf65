"""OpenAI-compatible request bodies (pydantic) and their translation into stage requests.

Unknown fields are ignored (clients send many); known fields are range-checked here and any
pydantic error becomes a 400 with OpenAI's error body. Fields OpenAI defines that omni-ray
cannot honour (``echo``, penalties, tools, ``response_format: url``) are rejected with 400
rather than silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from omni_ray.config import LimitsConfig
from omni_ray.errors import InvalidRequestError

Priority = Literal["high", "normal", "low"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


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


# ----------------------------------------------------------------------------- limits
def check_text_limits(req: _Sampling, max_new: int | None, limits: LimitsConfig) -> None:
    if req.n > limits.max_n:
        raise InvalidRequestError(f"n must be <= {limits.max_n}", param="n")
    if max_new is not None and max_new > limits.max_tokens:
        raise InvalidRequestError(f"max_tokens must be <= {limits.max_tokens}", param="max_tokens")


def check_image_limits(args: dict, limits: LimitsConfig) -> None:
    h, w = args.get("height"), args.get("width")
    if h and w and h * w > limits.max_image_pixels:
        raise InvalidRequestError(f"size {w}x{h} exceeds {limits.max_image_pixels} pixels", param="size")
    if args.get("num_inference_steps", 0) > limits.max_steps:
        raise InvalidRequestError(f"num_inference_steps must be <= {limits.max_steps}",
                                  param="num_inference_steps")
    if args.get("num_images_per_prompt", 1) > limits.max_images:
        raise InvalidRequestError(f"n must be <= {limits.max_images}", param="n")
