"""OpenAI-compatible request bodies (pydantic) and their conversion into the engines' params.

Unknown fields are ignored (clients send many); known fields are type-checked here (any pydantic
error becomes a 400 with OpenAI's error body). Their ranges are the engines' own rules
(``SAMPLING_RULES`` / ``DIFFUSION_RULES``): the fields document them as OpenAPI bounds and
``to_sampling_params()`` / ``to_diffusion_params()`` check them, once, with the same message an
offline caller gets. Fields OpenAI defines that omni-ray cannot honour (penalties, ``logit_bias``,
``functions``, ``suffix``, ``best_of`` != n, ``response_format: url``, ...: the
``*_REFUSED`` tables) are rejected with a 400 naming the field rather than silently ignored. Tool calling
(``tools``, ``tool_choice``, tool-call history): deployments/openai/tools.py; audio out (``modalities``,
``audio``) and ``/v1/audio/speech``: deployments/openai/audio.py.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.openai.structured import ResponseFormat, StructuredOutputsBody, structured_outputs_of
from deployments.openai.tools import ToolCallIn, ToolCalling, ToolChoice, ToolDefinition, constrain, history_message
from omni_ray.ar.sampling_params import SAMPLING_RULES, SamplingParams
from omni_ray.dit.params import DIFFUSION_RULES, DiffusionParams, parse_size
from omni_ray.errors import InvalidRequestError
from omni_ray.rules import Rule, check_prompt
from omni_ray.runner import StageArgs

Priority = Literal["high", "normal", "low"]
S, D = SAMPLING_RULES, DIFFUSION_RULES


def bounded(default: Any, rule: Rule) -> Any:
    """A field whose range is ``rule``: documented in the OpenAPI schema, checked by the params."""
    return Field(default, json_schema_extra=rule.json_schema())


class _Body(BaseModel):
    """Unknown fields are ignored; known ones are strict (no ``false`` as a token id, no ``1.0`` as
    ``n``, no ``"2"`` as ``max_tokens``): a value of the wrong JSON type is a 400."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)
    refused: ClassVar[dict] = {}      # OpenAI fields this body refuses (400 naming the field) unless unset

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data: Any) -> Any:
        bad = _first_non_utf8(data)
        if bad is not None:
            raise ValueError(f"{bad or 'value'}: text must be valid Unicode (a lone surrogate was sent)")
        refuse_unsupported(data, cls.refused)
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


# ----------------------------------------------------------------------------- fields refused
def _unset(*ok: Any) -> Callable[[Any], bool]:
    """A value that asks for nothing: None, an empty list / dict / string, or one of ``ok``."""
    return lambda v: v is None or v in ok or (isinstance(v, (list, dict, str)) and not v)


# field -> (values that ask for nothing, why anything else is refused). OpenAI fields whose value
# would change the output and that omni-ray does not implement: a 400 naming the field, never
# silently ignored. Fields that change nothing in the output (user, metadata, store, service_tier,
# prediction, prompt_cache_key, safety_identifier, moderation) are accepted and ignored (docs/serving.md).
TEXT_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logit_bias": (_unset(), "logit_bias is not supported"),
}
CHAT_REFUSED = TEXT_REFUSED | {
    "functions": (_unset(), "functions is deprecated by OpenAI and not supported; use tools"),
    "function_call": (_unset("none"), "function_call is deprecated by OpenAI and not supported; use tool_choice"),
    "reasoning_effort": (_unset(), "reasoning_effort is not supported"),
    "verbosity": (_unset(), "verbosity is not supported"),
    "web_search_options": (_unset(), "web search is not supported"),
}
COMPLETION_REFUSED = TEXT_REFUSED | {
    "suffix": (_unset(), "suffix (insertion) is not supported"),
}
IMAGE_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "output_format": (_unset("png"), "output_format must be png (images are PNG)"),
    "output_compression": (_unset(), "output_compression is not supported (images are PNG)"),
    "background": (_unset("auto", "opaque"), "background: only opaque images are supported"),
    "quality": (_unset("auto", "standard"), "quality is not supported; use num_inference_steps"),
    "style": (_unset(), "style is not supported; describe the style in the prompt"),
    "stream": (_unset(False), "streamed image generation is not supported"),
    "partial_images": (_unset(0), "partial_images is not supported"),
}


def refuse_unsupported(data: Any, refused: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raise InvalidRequestError (``param`` = the field) for the first field of ``data`` that asks
    for something in ``refused``."""
    if not isinstance(data, dict):
        return
    for name, (asks_nothing, why) in refused.items():
        v = data.get(name)
        try:
            fine = asks_nothing(v)
        except TypeError:                    # an unhashable value where a string was expected
            fine = False
        if not fine:
            raise InvalidRequestError(why, param=name)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = bounded(None, S["max_tokens"])
    temperature: float = bounded(1.0, S["temperature"])
    top_p: float = bounded(1.0, S["top_p"])
    top_k: int = bounded(-1, S["top_k"])              # extension
    min_p: float = bounded(0.0, S["min_p"])           # extension
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = bounded(None, S["seed"])
    ignore_eos: bool = False                         # extension
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    priority: Priority = "normal"                    # extension: the omni scheduler's class
    user: str | None = None
    # structured outputs (deployments/openai/structured.py): OpenAI's field, vLLM's extension and older names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

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

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options can only be set with stream: true", param="stream_options")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None (not asked), or how many alternatives besides each token."""
        return None

    @property
    def num_prompt_logprobs(self) -> int | None:
        return None

    def to_sampling_params(self) -> SamplingParams:
        """The engine's params (its rules checked here); max_tokens None = fill the context
        (resolved by the AR stage)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              max_tokens=self.max_new_tokens, ignore_eos=self.ignore_eos, stop=self.stop,
                              seed=self.seed, logprobs=self.num_logprobs, prompt_logprobs=self.num_prompt_logprobs,
                              structured_outputs=structured_outputs_of(self))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = bounded(16, S["max_tokens"])   # OpenAI's default for completions
    logprobs: int | None = bounded(None, S["logprobs"])   # each token's and this many alternatives (0..20)
    echo: bool = False                               # the prompt before the completion (with logprobs: its tokens')
    best_of: int | None = None
    refused: ClassVar[dict] = COMPLETION_REFUSED

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            why = "must be >= n" if self.best_of < self.n else "> n is not supported (only best_of == n)"
            raise InvalidRequestError(f"best_of {why}; got best_of={self.best_of}, n={self.n}", param="best_of")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        """echo with logprobs: the prompt's tokens too (lm-evaluation-harness's loglikelihood requests)."""
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt (each is checked when its stage request is built)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            check_prompt(p)                              # raises: an empty list
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None      # assistant: the calls it made (deployments/openai/tools.py)
    tool_call_id: str | None = None                 # tool: the call this is the result of
    audio: dict[str, Any] | None = None             # assistant: a previous audio reply ({"id"}): refused

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

    def content_for_template(self, i: int) -> str | list[dict]:
        """The text, or (a message with images / audio) its parts: ``text``, ``image_url`` ({"url": a
        data: URL}) and ``input_audio`` ({"data": base64, "format"}) checked for shape here and decoded
        by the AR stage (omni_ray/media: limits, no fetch unless configured)."""
        if not isinstance(self.content, list) or all(p.get("type") == "text" for p in self.content):
            return self.text()
        out = []
        for j, part in enumerate(self.content):
            kind, where = part.get("type"), f"messages.{i}.content.{j}"
            if kind == "text":
                out.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise InvalidRequestError("image_url needs a url (a data: URL)", param=f"{where}.image_url")
                out.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "input_audio":
                audio = part.get("input_audio")
                if not isinstance(audio, dict) or not isinstance(audio.get("data"), str) \
                        or not isinstance(audio.get("format"), str):
                    raise InvalidRequestError("input_audio needs data (base64) and format (wav, mp3, ...)",
                                              param=f"{where}.input_audio")
                out.append({"type": "input_audio", "input_audio": {"data": audio["data"], "format": audio["format"]}})
            else:
                raise InvalidRequestError(f"content part type {kind!r} is not supported (text, image_url, "
                                          "input_audio)", param=where)
        return out


class ChatAudioParam(_Body):
    """``audio`` of a chat request (OpenAI's ChatCompletionAudioParam): checked by deployments/openai/audio.py."""

    voice: str | dict[str, Any]
    format: Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = bounded(None, S["max_tokens"])
    logprobs: bool = False
    top_logprobs: int | None = bounded(None, S["logprobs"])   # alternatives per token (0..20; needs logprobs)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text", "audio"]] | None = None     # ["text", "audio"]: audio out (openai/audio.py)
    audio: ChatAudioParam | None = None
    stage_args: dict[str, dict[str, Any]] | None = None          # extension, audio out: per speech stage
    refused: ClassVar[dict] = CHAT_REFUSED

    @model_validator(mode="after")
    def _stage_args_need_audio(self):
        if self.stage_args and not self.wants_audio:
            raise InvalidRequestError("stage_args applies to audio out (modalities with audio): the stages of the "
                                      "model's speech pipeline", param="stage_args")
        return self

    @property
    def wants_audio(self) -> bool:
        """Audio out was asked for (``modalities`` has audio, or ``audio`` is set: both are checked)."""
        return "audio" in (self.modalities or []) or self.audio is not None

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None:
            S["logprobs"].check("top_logprobs", self.top_logprobs)       # errors name the field sent
            if not self.logprobs:
                raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict]:
        out = []
        for i, m in enumerate(self.messages):
            if m.audio:
                raise InvalidRequestError("audio replies are not kept by this server: send the assistant's reply "
                                          "as content (its transcript)", param=f"messages.{i}.audio")
            role = "system" if m.role == "developer" else m.role
            out.append(history_message(i, role, m.content_for_template(i), m.tool_calls, m.tool_call_id, m.name))
        return out

    def tool_calling(self, parser: str | None, model: str) -> ToolCalling | None:
        """How this request calls tools (None: it does not), given its stage's tool-call parser."""
        return ToolCalling.of(self.tools, self.tool_choice, self.parallel_tool_calls, parser, model)

    def to_sampling_params(self) -> SamplingParams:
        """The sampling params, constrained to tool calls by tool_choice required / named."""
        return constrain(super().to_sampling_params(), self.tools, self.tool_choice, self.parallel_tool_calls)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class _ImageArgs(_Body):
    n: int = bounded(1, D["num_images_per_prompt"])
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    num_inference_steps: int | None = bounded(None, D["num_inference_steps"])   # extensions below
    guidance_scale: float | None = bounded(None, D["guidance_scale"])
    seed: int | None = bounded(None, D["seed"])
    negative_prompt: str | None = None
    cache: bool | str | dict | None = None

    @field_validator("response_format")
    @classmethod
    def _b64_only(cls, v: str) -> str:
        if v == "url":
            raise ValueError("response_format 'url' is not supported; use 'b64_json'")
        return v

    def diffusion(self) -> dict:
        """The DiffusionParams fields this body sets (None = the engine's default)."""
        h, w = parse_size(self.size)
        D["num_images_per_prompt"].check("n", self.n)        # OpenAI's name for it: errors say "n"
        kw = dict(height=h, width=w, num_inference_steps=self.num_inference_steps,
                  guidance_scale=self.guidance_scale, seed=self.seed, negative_prompt=self.negative_prompt,
                  num_images_per_prompt=self.n, cache=self.cache)
        return {k: v for k, v in kw.items() if v is not None}

    def to_diffusion_params(self) -> DiffusionParams:
        return DiffusionParams(**self.diffusion())


class ImageGenerationRequest(_ImageArgs):
    prompt: str = Field(json_schema_extra={"minLength": 1})     # checked by the route (rules.check_text)
    model: str | None = None
    priority: Priority = "normal"
    user: str | None = None
    refused: ClassVar[dict] = IMAGE_REFUSED


class PipelineRequest(_ImageArgs):
    """``POST /v1/pipelines/{name}``: one prompt through every step of a pipeline.

    Text fields apply to AR steps, image fields to DiT steps; ``stage_args`` overrides per stage
    key (e.g. ``{"llm": {"max_tokens": 32}}``)."""

    pipeline: str | None = None                     # for /v1/pipelines/run
    prompt: str = Field(json_schema_extra={"minLength": 1})     # checked by the route (rules.check_text)
    image: str | None = None                        # pipelines that edit an image: a data: URL or base64
    stream: bool = False
    priority: Priority = "normal"
    max_tokens: int | None = bounded(None, S["max_tokens"])
    temperature: float = bounded(1.0, S["temperature"])
    top_p: float = bounded(1.0, S["top_p"])
    stop: str | list[str] | None = None
    stage_args: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def text_args(self) -> dict:
        """The SamplingParams fields this body sets for every AR step."""
        kw = dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                  stop=[self.stop] if isinstance(self.stop, str) else self.stop)
        return {k: v for k, v in kw.items() if v is not None}

    def to_sampling_params(self) -> SamplingParams:
        """The request-wide text params (each AR step adds its own overrides)."""
        return SamplingParams(**self.text_args() | {"max_tokens": self.max_tokens})

    def to_stage_args(self) -> StageArgs:
        return StageArgs(text=self.text_args(), image=self.diffusion(), per_stage=self.stage_args)


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
