"""Multi-stage pipelines: one step runner shared by the Serve app and the offline ``OmniLLM``.

A pipeline (``OmniConfig.pipelines``) is a list of steps; each step sends its input (the
request's prompt, the previous step's text, or its prompt hidden states) to a stage. This module
knows how to turn a step into a stage call; *where* the stage runs is a backend:

    offline  OmniLLM: the engines in this process (AsyncLLM / AsyncDiTEngine on a private loop)
    online   deployments/ingress/remote_stages.py: Serve handles to the stage deployments

Stage requests are plain dicts (the same dict goes over Ray or to a local engine):

    AR   {"request_id", "prompt": str | list[int] | None, "messages": [...] | None,
          "system_prompt": str | None, "params": SamplingParams kwargs (max_tokens may be None)}
    DiT  {"request_id", "prompt": str | None, "params": DiffusionParams kwargs}

``run_pipeline`` yields events (dicts with a ``type``): ``stage_start``, ``text`` (a delta),
``progress`` (a denoising step), ``stage_end`` (timings), and one final ``result``.
Hidden states move between steps as a handoff dict ``{"ref" | "tensor", "shape"}``: online the
ref is a Ray ObjectRef the runner never resolves.

    llm = OmniLLM("serve_config.yaml")
    out = llm.generate("text2image", "a red fox", num_inference_steps=4, size="64x64")
    out.text, out.images[0].save("fox.png")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

import torch

from omni_ray.config import LimitsConfig, PipelineConfig, PipelineStep
from omni_ray.errors import EngineError, InvalidRequestError


# ============================================================================ AR stage calls
def prompt_ids(tokenizer, req: Mapping, max_prompt_tokens: int | None = None) -> list[int]:
    """The token ids of an AR request: chat ``messages`` (chat template), or a ``prompt`` that is
    wrapped as a user turn when ``system_prompt`` is set, or a raw prompt / token ids."""
    messages = req.get("messages")
    prompt = req.get("prompt")
    if messages is None and req.get("system_prompt"):
        messages = [{"role": "system", "content": req["system_prompt"]}, {"role": "user", "content": prompt}]
    if messages is not None:
        ids = render_chat(tokenizer, messages)
    elif isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty", param="prompt")
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    elif isinstance(prompt, list) and prompt:
        ids = prompt                                   # token ids; the engine checks the vocabulary
    else:
        raise InvalidRequestError("prompt must be a non-empty string or list of token ids", param="prompt")
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise InvalidRequestError(f"prompt has {len(ids)} tokens; the limit is {max_prompt_tokens}", param="prompt")
    return list(ids)


def pretokenize(tokenizer, reqs: list[dict]) -> list[dict]:
    """``reqs`` with each plain text prompt (no chat messages, no system prompt) replaced by its
    token ids, all encoded in one batch call (the tokenizer's Rust batch path): a burst's prompts
    cost the replica one call, not one each. Anything else is left for ``prompt_ids``."""
    idx = [i for i, r in enumerate(reqs) if isinstance(r.get("prompt"), str) and r["prompt"]
           and r.get("messages") is None and not r.get("system_prompt")]
    if len(idx) < 2:
        return reqs
    texts = [reqs[i]["prompt"] for i in idx]
    backend = getattr(tokenizer, "backend_tokenizer", None)      # fast tokenizers: the Rust one, no wrapper
    if backend is not None:
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
    else:
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    out = list(reqs)
    for i, toks in zip(idx, ids):
        out[i] = reqs[i] | {"prompt": list(toks)}
    return out


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    if not messages:
        raise InvalidRequestError("messages is empty", param="messages")
    if getattr(tokenizer, "chat_template", None) is None:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return tokenizer.encode(text, add_special_tokens=True)
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    except Exception as err:  # template errors (e.g. role order) are the caller's fault
        raise InvalidRequestError(f"chat template failed: {err}", param="messages") from None
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def sampling_params(params: Mapping, num_prompt_tokens: int, max_model_len: int, max_tokens_cap: int):
    """SamplingParams from request kwargs; ``max_tokens=None`` fills the context (up to the cap)."""
    from omni_ray.ar import SamplingParams

    kw = dict(params)
    if kw.get("max_tokens") is None:
        room = max_model_len - num_prompt_tokens
        if room < 1:
            raise InvalidRequestError(f"prompt has {num_prompt_tokens} tokens; max_model_len is {max_model_len}",
                                      param="messages")
        kw["max_tokens"] = min(room, max_tokens_cap)
    try:
        return SamplingParams(**kw)
    except TypeError as err:
        raise InvalidRequestError(f"bad sampling parameter: {err}") from None


async def ar_generate(engine, req: Mapping, limits: LimitsConfig | None = None, interval=None) -> AsyncIterator[dict]:
    """Stream one AR request on an ``AsyncLLM``: dict deltas (text, token_ids, logprobs, tokens...),
    at most one per ``interval`` (``AsyncLLM.generate``: the engine merges what comes meanwhile)."""
    limits = limits or LimitsConfig()
    ids = prompt_ids(engine.tokenizer, req, limits.max_prompt_tokens)
    params = sampling_params(req.get("params") or {}, len(ids), engine.max_model_len, limits.max_tokens)
    async for out in engine.generate(ids, params, req["request_id"], interval=interval):
        d = {"text": out.text, "token_ids": list(out.token_ids), "logprobs": out.logprobs,
             "finished": out.finished, "finish_reason": out.finish_reason,
             "num_prompt_tokens": out.num_prompt_tokens, "num_output_tokens": out.num_output_tokens}
        if params.logprobs:
            d["tokens"] = engine.tokenizer.convert_ids_to_tokens(d["token_ids"])
        yield d


async def ar_encode(engine, req: Mapping, limits: LimitsConfig | None = None) -> torch.Tensor:
    """Prompt hidden states [T, H] (float32, CPU) of one AR request."""
    limits = limits or LimitsConfig()
    ids = prompt_ids(engine.tokenizer, req, limits.max_prompt_tokens)
    return await engine.encode(ids, req["request_id"], layer=req.get("layer"))


def merge_deltas(items: list[dict]) -> dict:
    """Fold consecutive AR deltas into one (a streaming consumer that fell behind gets one message)."""
    out = dict(items[-1])
    out["text"] = "".join(d["text"] for d in items)
    out["token_ids"] = [t for d in items for t in d["token_ids"]]
    if items[-1].get("logprobs") is not None:
        out["logprobs"] = [x for d in items for x in (d.get("logprobs") or [])]
    if "tokens" in items[-1]:
        out["tokens"] = [x for d in items for x in d.get("tokens", [])]
    return out


# ============================================================================ DiT stage calls
def diffusion_params(params: Mapping):
    from omni_ray.dit.params import DiffusionParams

    try:
        return DiffusionParams(**dict(params))
    except TypeError as err:
        raise InvalidRequestError(f"bad image parameter: {err}") from None


async def dit_generate(engine, req: Mapping, embeds: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> AsyncIterator[dict]:
    """Run one DiT request: ``{"kind": "progress", "step", "total"}`` then ``{"kind": "done", "images"}``.

    ``embeds`` [T, H] (``mask`` [T], default all ones): ready conditioning, e.g. an AR stage's prompt
    hidden states (an LLM-conditioned DiT) or a cached text-encoder output."""
    params = diffusion_params(req.get("params") or {})
    kw = {}
    if embeds is not None:
        mask = mask if mask is not None else torch.ones(embeds.shape[0], dtype=torch.long)
        kw = {"prompt_embeds": embeds, "prompt_mask": mask}
    async for ev in engine.generate(req.get("prompt"), params, req["request_id"], **kw):
        if ev.kind == "progress":
            yield {"kind": "progress", "step": ev.step, "total": ev.total}
        elif ev.kind == "done":
            yield {"kind": "done", "images": list(ev.images), "info": dict(ev.stats or {})}


# ============================================================================ the step runner
@dataclass
class StageArgs:
    """Per-request arguments: ``text`` for AR steps, ``image`` for DiT steps, ``per_stage`` overrides."""

    text: dict = field(default_factory=dict)
    image: dict = field(default_factory=dict)
    per_stage: dict[str, dict] = field(default_factory=dict)

    def for_step(self, step: PipelineStep, kind: str) -> dict:
        base = dict(self.text if kind == "ar" else self.image)
        if kind == "ar" and step.max_tokens is not None:
            base.setdefault("max_tokens", step.max_tokens)
        base.update(self.per_stage.get(step.stage, {}))
        return base


def _step_request(step: PipelineStep, kind: str, value: Any, args: StageArgs, rid: str) -> dict:
    params = args.for_step(step, kind)
    if kind == "ar":
        system = params.pop("system_prompt", step.system_prompt)
        layer = params.pop("layer", None)
        if step.output == "hidden_states":   # the prompt itself (with the system prompt if any) is encoded
            return {"request_id": rid, "prompt": value, "system_prompt": system, "params": {}, "layer": layer}
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": value}]
        return {"request_id": rid, "messages": messages, "params": params}
    prompt = value if isinstance(value, str) else params.pop("prompt", None)
    return {"request_id": rid, "prompt": prompt, "params": params}


async def run_pipeline(pipeline: PipelineConfig, backends: Mapping[str, Any], kinds: Mapping[str, str],
                       prompt: str, request_id: str, args: StageArgs | None = None) -> AsyncIterator[dict]:
    """Run every step of ``pipeline``; ``backends[stage]`` has ``generate(req[, hidden])`` (async
    iterator) and, for AR stages, ``async encode(req) -> handoff``."""
    args = args or StageArgs()
    value: Any = prompt
    stages: list[dict] = []
    result: dict = {"text": None, "images": None, "hidden_states": None}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for i, step in enumerate(pipeline.steps):
        kind, backend = kinds[step.stage], backends[step.stage]
        req = _step_request(step, kind, value, args, f"{request_id}-{i}")
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
            value = result["hidden_states"] = await backend.encode(req)
            info = {"shape": list(value["shape"])} | {k: value[k] for k in ("object_id", "cache") if k in value}
        else:
            hidden = value if isinstance(value, dict) else None
            images, extra = None, {}
            async for ev in backend.generate(req, hidden):
                if ev["kind"] == "progress":
                    yield {"type": "progress", "step": i, "stage": step.stage,
                           "current": ev["step"], "total": ev["total"]}
                elif ev["kind"] == "done":
                    images, extra = ev["images"], ev.get("info") or {}
            if images is None:
                raise EngineError(f"stage {step.stage!r} ended without images")
            value = result["images"] = images
            info = {"num_images": len(images), **extra}
        elapsed = time.perf_counter() - t0
        stages.append({"step": i, "stage": step.stage, "output": step.output, "elapsed_s": elapsed, **info})
        yield {"type": "stage_end", **stages[-1]}
    yield {"type": "result", **result, "stages": stages, "usage": usage | {
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}


# ============================================================================ arguments
_SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "ignore_eos",
                  "logprobs", "system_prompt", "layer"}
_IMAGE_KEYS = {"height", "width", "num_inference_steps", "guidance_scale", "seed", "negative_prompt",
               "num_images_per_prompt", "cache"}


def split_stage_args(kwargs: dict) -> StageArgs:
    """``generate(..., max_tokens=32, size="64x64", seed=1, stage_args={"llm": {...}})`` -> StageArgs."""
    kwargs = dict(kwargs)
    per_stage = kwargs.pop("stage_args", None) or {}
    if "size" in kwargs:
        size = str(kwargs.pop("size"))
        try:
            w, h = (int(x) for x in size.split("x"))
        except ValueError:
            raise InvalidRequestError(f"size must look like '512x512' (WxH), got {size!r}", param="size") from None
        kwargs.update(height=h, width=w)
    if "n" in kwargs:
        kwargs["num_images_per_prompt"] = kwargs.pop("n")
    unknown = set(kwargs) - _SAMPLING_KEYS - _IMAGE_KEYS
    if unknown:
        raise InvalidRequestError(f"unknown stage arguments: {sorted(unknown)}")
    return StageArgs(text={k: v for k, v in kwargs.items() if k in _SAMPLING_KEYS},
                     image={k: v for k, v in kwargs.items() if k in _IMAGE_KEYS}, per_stage=per_stage)
