"""The pipeline runner: one step runner shared by the Serve app and the offline ``OmniLLM``.

A pipeline (``OmniConfig.pipelines``) is a list of steps; each step sends its input (the
request's prompt, the previous step's text, or its prompt hidden states) to a stage as a typed
request (``omni_ray.stages.requests``). *Where* the stage runs is a backend:

    offline  omni_ray/offline.py: the stage engines in this process
    online   deployments/ingress/remote_stages.py: Serve handles to the stage deployments

A backend has ``generate(req)`` (an async iterator of dicts) and, for AR stages, ``async
encode(req) -> Handoff`` (and optionally ``encode_batch(reqs)``: a prompt and its negative prompt in
one call). ``run_pipeline`` yields events (dicts with a ``type``): ``stage_start``,
``text`` (a delta), ``progress`` (a denoising step), ``stage_end`` (timings), and one final
``result`` (``videos``: the MP4s a Serve DiT stage encodes, or the frame arrays of an offline one).
Hidden states move between steps as a ``Handoff``: online its ref is a Ray ObjectRef the runner
never resolves.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

from omni_ray.ar.sampling_params import SAMPLING_KEYS, SamplingParams
from omni_ray.config import PipelineConfig, PipelineStep
from omni_ray.dit.params import DIFFUSION_KEYS, DIFFUSION_RULES, DiffusionParams, parse_size
from omni_ray.errors import ConfigError, EngineError, InvalidRequestError
from omni_ray.stages.requests import ARRequest, DiTRequest, Handoff, ImageInput

AR_STEP_KEYS = SAMPLING_KEYS | {"system_prompt", "layer"}           # SamplingParams + the request's own
DIT_STEP_KEYS = DIFFUSION_KEYS | {"prompt", "size", "n"}             # DiffusionParams + prompt, OpenAI's names


def step_kwargs(kind: str, raw: Mapping, prefix: str = "") -> dict:
    """Validated arguments of one kind of step (one stage's ``stage_args``, or the request-wide text
    / image ones): known keys only, ``size`` -> height/width, ``n`` -> num_images_per_prompt, every
    value checked by the params' own rules. Errors name ``<prefix><field>``."""
    kw = dict(raw)
    keys = AR_STEP_KEYS if kind == "ar" else DIT_STEP_KEYS
    unknown = sorted(set(kw) - keys)
    if unknown:
        raise InvalidRequestError(f"{prefix}{unknown[0]}: not an argument of {'an AR' if kind == 'ar' else 'a DiT'} "
                                  f"step (known: {sorted(keys)})", param=f"{prefix}{unknown[0]}")
    try:
        if kind == "ar":
            ARRequest("check", prompt="x", system_prompt=kw.get("system_prompt"), layer=kw.get("layer"),
                      params=SamplingParams(**{k: v for k, v in kw.items() if k in SAMPLING_KEYS}))
            if isinstance(kw.get("stop"), str):
                kw["stop"] = [kw["stop"]]
            return {k: v for k, v in kw.items() if v is not None}
        if "size" in kw:
            kw["height"], kw["width"] = parse_size(kw.pop("size"))
        if "n" in kw:                                       # OpenAI's name: errors say "n"
            kw["num_images_per_prompt"] = DIFFUSION_RULES["num_images_per_prompt"].check("n", kw.pop("n"))
        DiTRequest("check", prompt=kw.get("prompt"),
                   params=DiffusionParams(**{k: v for k, v in kw.items() if k in DIFFUSION_KEYS}))
        return {k: v for k, v in kw.items() if v is not None}
    except InvalidRequestError as err:
        if not prefix:
            raise
        raise InvalidRequestError(prefix + err.message, param=prefix + (err.param or "")) from None


@dataclass
class StageArgs:
    """Per-request arguments: ``text`` for AR steps, ``image`` for DiT steps, ``per_stage`` overrides
    (plain kwargs; ``params_for`` builds each step's typed params once)."""

    text: dict = field(default_factory=dict)
    image: dict = field(default_factory=dict)
    per_stage: dict[str, dict] = field(default_factory=dict)
    _built: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping) -> StageArgs:
        """``generate(..., max_tokens=32, size="64x64", seed=1, stage_args={"llm": {...}})``: keys
        go to the steps that take them (``seed`` to both kinds); the values are checked here."""
        kwargs = dict(kwargs)
        per_stage = kwargs.pop("stage_args", None) or {}
        unknown = set(kwargs) - AR_STEP_KEYS - DIT_STEP_KEYS | ({"prompt"} & set(kwargs))
        if unknown:
            raise InvalidRequestError(f"unknown stage arguments: {sorted(unknown)}")
        return cls(text=step_kwargs("ar", {k: v for k, v in kwargs.items() if k in AR_STEP_KEYS}),
                   image=step_kwargs("dit", {k: v for k, v in kwargs.items() if k in DIT_STEP_KEYS}),
                   per_stage=per_stage)

    def validate(self, name: str, pipe: PipelineConfig, kinds: Mapping[str, str]) -> None:
        """Check every argument for ``pipe`` (named ``name``): the kwargs are replaced by the
        validated ones and every step's typed params are built (once)."""
        if not isinstance(self.per_stage, dict):
            raise InvalidRequestError("stage_args must be an object {stage: {...}}", param="stage_args")
        unknown = set(self.per_stage) - {s.stage for s in pipe.steps}
        if unknown:
            raise InvalidRequestError(f"stage_args names stages not in pipeline {name!r}: {sorted(unknown)}",
                                      param="stage_args")
        self.text, self.image = step_kwargs("ar", self.text), step_kwargs("dit", self.image)
        for stage, raw in list(self.per_stage.items()):
            if not isinstance(raw, dict):
                raise InvalidRequestError(f"stage_args.{stage} must be an object", param=f"stage_args.{stage}")
            self.per_stage[stage] = step_kwargs(kinds[stage], raw, f"stage_args.{stage}.")
        self._built.clear()
        for i, step in enumerate(pipe.steps):
            self.params_for(i, step, kinds[step.stage])

    def for_step(self, step: PipelineStep, kind: str) -> dict:
        base = dict(self.text if kind == "ar" else self.image)
        if kind == "ar" and step.max_tokens is not None:
            base.setdefault("max_tokens", step.max_tokens)
        base.update(self.per_stage.get(step.stage, {}))
        return base

    def params_for(self, i: int, step: PipelineStep, kind: str) -> tuple[Any, dict]:
        """(SamplingParams | DiffusionParams, the step's other fields) of step ``i``, built once."""
        if i not in self._built:
            kw = self.for_step(step, kind)
            if kind == "ar":
                extra = {"system_prompt": kw.pop("system_prompt", step.system_prompt), "layer": kw.pop("layer", None)}
                kw.setdefault("max_tokens", None)            # not given: up to the context (the AR stage resolves it)
                self._built[i] = (SamplingParams(**kw), extra)
            else:
                extra = {"prompt": kw.pop("prompt", None)}
                self._built[i] = (DiffusionParams(**kw), extra)
        return self._built[i]


def step_request(i: int, step: PipelineStep, kind: str, value: Any, args: StageArgs, rid: str,
                 negative: Handoff | None = None, image: ImageInput | None = None, messages: list[dict] | None = None):
    """The typed request of step ``i`` given its input ``value`` (text, or a Handoff); ``negative``:
    the negative prompt's Handoff (a DiT step under true CFG); ``image``: the request's input image
    (pipelines that take one: every step gets it); ``messages``: chat messages instead of ``value`` (an AR
    text step; the step's system prompt goes first unless they have one)."""
    params, extra = args.params_for(i, step, kind)
    if kind == "ar":
        system = extra["system_prompt"]
        if step.output == "hidden_states":   # the prompt itself (with the system prompt if any) is encoded
            return encode_request(rid, value, step, extra, image)
        if messages is not None:
            own = any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
            return ARRequest(rid, messages=([{"role": "system", "content": system}] if system and not own else [])
                             + list(messages), params=params)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": value}]
        return ARRequest(rid, messages=messages, params=params)
    if isinstance(value, Handoff):
        return DiTRequest(rid, prompt=extra["prompt"], params=params, conditioning=value,
                          negative_conditioning=negative, image=image)
    return DiTRequest(rid, prompt=value, params=params, image=image)


def encode_request(rid: str, text: str, step: PipelineStep, extra: dict, image: ImageInput | None) -> ARRequest:
    """An AR hidden_states step's request: the prompt as it is, or through the step's text-encoding
    recipe (``step.encoding``: a diffusers pipeline's template; the edit image goes through the VL
    model's vision tower with it)."""
    kw: dict = {}
    if step.encoding:
        from omni_ray.ar.text_encoding import text_encoding_for

        kw["encoding"] = text_encoding_for(step.encoding)
        if kw["encoding"] is None:
            raise ConfigError(f"stage {step.stage!r}: no text-encoding recipe for {step.encoding!r}")
    if image is not None:
        kw["multi_modal_data"] = {"image": image}
    return ARRequest(rid, prompt=text, system_prompt=extra["system_prompt"], layer=extra["layer"], **kw)


def negative_prompt_for(i: int, pipeline: PipelineConfig, kinds: Mapping[str, str], args: StageArgs) -> str | None:
    """The negative prompt that AR step ``i`` encodes beside the prompt: when it encodes with a
    pipeline's recipe and the DiT step it feeds runs true CFG with one (``negative_prompt`` given,
    guidance not <= 1: diffusers' ``true_cfg_scale > 1 and has_neg_prompt``)."""
    step = pipeline.steps[i]
    if step.output != "hidden_states" or not step.encoding or i + 1 >= len(pipeline.steps):
        return None
    nxt = pipeline.steps[i + 1]
    if kinds[nxt.stage] != "dit":
        return None
    params, _ = args.params_for(i + 1, nxt, "dit")
    if params.negative_prompt is None or (params.guidance_scale is not None and params.guidance_scale <= 1.0):
        return None
    if not params.negative_prompt:
        raise InvalidRequestError("negative_prompt is empty: the text encoder needs some text (e.g. \" \"), or "
                                  "leave it out for no true CFG", param="negative_prompt")
    return params.negative_prompt


def check_image(name: str, pipeline: PipelineConfig, image: Any) -> None:
    """A pipeline that needs an input image gets one; one that takes none gets none; optional: either (400 naming
    ``image``)."""
    if pipeline.image == "required" and image is None:
        raise InvalidRequestError(f"{name} edits an image: give the input image (POST /v1/images/edits, "
                                  "or `image` of a pipeline request)", param="image")
    if pipeline.image == "none" and image is not None:
        raise InvalidRequestError(f"{name} takes no input image", param="image")


async def _encode(backend, req: ARRequest, negative: ARRequest | None) -> tuple[Handoff, Handoff | None]:
    """The prompt's Handoff, and the negative prompt's, both requests in flight at once: in one stage
    call (one engine step) where the backend has ``encode_batch``."""
    if negative is None:
        return await backend.encode(req), None
    if hasattr(backend, "encode_batch"):
        pos, neg = await backend.encode_batch([req, negative])
    else:
        pos, neg = await asyncio.gather(backend.encode(req), backend.encode(negative))
    return pos, neg


def _handoff_info(h: Handoff) -> dict:
    return {"shape": list(h.shape)} | {k: v for k, v in (("object_id", h.object_id), ("cache", h.cache))
                                       if v is not None}


async def run_pipeline(pipeline: PipelineConfig, backends: Mapping[str, Any], kinds: Mapping[str, str],
                       prompt: str | None, request_id: str, args: StageArgs | None = None,
                       image: ImageInput | None = None, messages: list[dict] | None = None,
                       audio: dict | None = None) -> AsyncIterator[dict]:
    """Run every step of ``pipeline``; ``backends[stage]`` has ``generate(req)`` (async iterator)
    and, for AR stages, ``async encode(req) -> Handoff``. ``image``: the request's input image, for
    a pipeline whose ``image`` is required (it goes to every step). ``messages``: chat messages (media
    parts included) instead of ``prompt`` for the first step (an AR text step). ``audio``: ``{"voice": ...}``
    runs a speech pipeline's talker and token2wav steps (``omni_ray/runner_speech.py``: ``audio`` events,
    the result's ``audio``); None runs its text steps only."""
    from omni_ray.runner_speech import check_audio, is_speech, run_speech, text_part

    args = args or StageArgs()
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("give exactly one of prompt and messages", param="messages")
    if messages is not None and (kinds[pipeline.steps[0].stage] != "ar" or pipeline.steps[0].output != "text"):
        raise InvalidRequestError("chat messages go to a pipeline whose first step generates text", param="messages")
    if audio is not None:
        talker = next(s.stage for s in pipeline.steps if s.output == "codec_tokens") if is_speech(pipeline) else None
        voice = check_audio(audio, pipeline, backends[talker].voices if talker else [])
        async for ev in run_speech(pipeline, backends, kinds, prompt, request_id, args, voice, messages,
                                   step_request=step_request):
            yield ev
        return
    if is_speech(pipeline):
        pipeline = text_part(pipeline)
    value: Any = prompt
    negative: Handoff | None = None
    check_image("this pipeline", pipeline, image)
    negatives = {i: negative_prompt_for(i, pipeline, kinds, args) for i in range(len(pipeline.steps))
                 if kinds[pipeline.steps[i].stage] == "ar"}             # checked before the first stage runs
    stages: list[dict] = []
    result: dict = {"text": None, "images": None, "hidden_states": None, "videos": None}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for i, step in enumerate(pipeline.steps):
        kind, backend = kinds[step.stage], backends[step.stage]
        req = step_request(i, step, kind, value, args, f"{request_id}-{i}", negative, image, messages if i == 0
                           else None)
        yield {"type": "stage_start", "step": i, "stage": step.stage, "input": step.input, "output": step.output}
        t0 = time.perf_counter()
        info: dict = {}
        if kind == "ar" and step.output == "text":
            parts: list[str] = []
            last = None
            async for out in backend.generate(req):
                if out["text"]:
                    parts.append(out["text"])
                    yield {"type": "text", "step": i, "stage": step.stage, "delta": out["text"]}
                last = out
            if last is None:
                raise EngineError(f"stage {step.stage!r} ended without output")
            usage["prompt_tokens"] += last["num_prompt_tokens"]
            usage["completion_tokens"] += last["num_output_tokens"]
            value = result["text"] = "".join(parts)
            info = {"finish_reason": last["finish_reason"], "num_output_tokens": last["num_output_tokens"]}
            if i + 1 < len(pipeline.steps) and not value.strip():
                value, info["fallback"] = prompt, "empty rewrite; the next stage got the original prompt"
        elif kind == "ar":
            neg_text = negatives[i]
            neg_req = None if neg_text is None else encode_request(
                f"{request_id}-{i}-neg", neg_text, step, args.params_for(i, step, kind)[1], image)
            value, negative = await _encode(backend, req, neg_req)
            result["hidden_states"] = value
            usage["prompt_tokens"] += value.shape[0] + (negative.shape[0] if negative else 0)   # [T, H]: T tokens
            info = _handoff_info(value) | ({"negative": _handoff_info(negative)} if negative else {})
        else:
            images, extra, videos = None, {}, False
            async for ev in backend.generate(req):
                if ev["kind"] == "progress":
                    yield {"type": "progress", "step": i, "stage": step.stage,
                           "current": ev["step"], "total": ev["total"]}
                elif ev["kind"] == "done":          # a video model's Serve stage sends MP4s as "videos"
                    images, extra, videos = ev.get("videos", ev.get("images")), ev.get("info") or {}, "videos" in ev
            if images is None:
                raise EngineError(f"stage {step.stage!r} ended without {step.output}")
            if videos and step.output != "videos":
                raise ConfigError(f"pipeline step {i}: stage {step.stage!r} makes videos; write the step's "
                                  "output as videos")
            value = result[step.output] = images
            info = {f"num_{step.output}": len(images), **extra}
        elapsed = time.perf_counter() - t0
        stages.append({"step": i, "stage": step.stage, "output": step.output, "elapsed_s": elapsed, **info})
        yield {"type": "stage_end", **stages[-1]}
    yield {"type": "result", **result, "stages": stages, "usage": usage | {
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}
