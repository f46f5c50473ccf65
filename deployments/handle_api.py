"""The ingress's typed Python API, for other Ray apps: ``serve.get_app_handle("omni")``.

    h = serve.get_app_handle("omni")
    await h.generate_text.remote("Hello", max_tokens=16)            -> {"text", "token_ids", "usage", ...}
    h.options(stream=True).stream_text.remote("Hello")               -> text deltas
    await h.generate_images.remote("a fox", size="64x64")            -> {"images": [PNG bytes | PIL], ...}
    await h.run_pipeline.remote("text2image", "a fox", max_tokens=8) -> {"text", "images", "stages", ...}

Arguments are validated by the same request models as the HTTP API; errors arrive as the same
typed exceptions (InvalidRequestError, ModelNotFoundError, QueueFullError, ...).
"""

import asyncio
import io
from typing import Any, AsyncIterator

from pydantic import ValidationError

from deployments.ingress_core import new_id
from deployments.openai_format import usage
from deployments.protocol import (ChatCompletionRequest, CompletionRequest, ImageGenerationRequest,
                                  check_pipeline_limits, check_text_limits)
from deployments.streams import cancellable
from omni_ray.errors import InvalidRequestError
from omni_ray.pipeline import StageArgs, split_stage_args


def _validated(cls, **kw):
    """Build a protocol model from Python-handle kwargs; pydantic errors become InvalidRequestError."""
    try:
        return cls(**kw)
    except ValidationError as err:
        e = err.errors()[0]
        raise InvalidRequestError(f"{'.'.join(map(str, e['loc']))}: {e['msg']}",
                                  param=".".join(map(str, e["loc"]))) from None


def _images_as(pngs: list[bytes], fmt: str) -> list:
    if fmt == "png":
        return list(pngs)
    if fmt == "pil":
        from PIL import Image
        return [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    raise InvalidRequestError(f"output_format must be 'png' or 'pil', got {fmt!r}", param="output_format")


class HandleAPI:
    """Mixed into the Ingress deployment (needs IngressCore)."""

    async def generate_text(self, prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
                            model: str | None = None, max_tokens: int | None = 64, temperature: float = 1.0,
                            top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                            n: int = 1, logprobs: bool = False, ignore_eos: bool = False,
                            priority: str = "normal") -> dict:
        """One text generation. ``messages`` uses the chat template; ``prompt`` is raw text or token ids.
        Returns ``{"text", "token_ids", "finish_reason", "usage", "model"}`` (plus ``choices`` when n > 1,
        ``logprobs`` when asked)."""
        body, prompts = self._handle_text_body(prompt, messages, model=model, max_tokens=max_tokens,
                                               temperature=temperature, top_p=top_p, seed=seed, stop=stop, n=n,
                                               ignore_eos=ignore_eos, priority=priority)
        stage = self._stage(model, "ar")
        check_text_limits(body, max_tokens, self.limits)
        rid = new_id("handle")
        reqs = self._text_requests(rid, prompts, body, max_tokens, logprobs)
        choices = await self._unary(rid, "generate_text", [stage], priority, lambda t: self._collect(stage, reqs, t))
        c = choices[0]
        out = {"id": rid, "model": self.names[stage], "text": c.text, "token_ids": c.token_ids,
               "finish_reason": c.finish_reason, "usage": usage(choices, {0: c.prompt_tokens})}
        if logprobs:
            out["logprobs"], out["tokens"] = c.logprobs, c.tokens
        if n > 1:
            out["choices"] = [{"text": x.text, "token_ids": x.token_ids, "finish_reason": x.finish_reason}
                              for x in choices]
        return out

    async def stream_text(self, prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
                          model: str | None = None, max_tokens: int | None = 64, temperature: float = 1.0,
                          top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                          ignore_eos: bool = False, priority: str = "normal") -> AsyncIterator[str]:
        """Text deltas as they are generated (call with ``handle.options(stream=True)``)."""
        body, prompts = self._handle_text_body(prompt, messages, model=model, max_tokens=max_tokens,
                                               temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                                               ignore_eos=ignore_eos, priority=priority)
        stage = self._stage(model, "ar")
        check_text_limits(body, max_tokens, self.limits)
        rid = new_id("handle")
        reqs = self._text_requests(rid, prompts, body, max_tokens, False)
        ticket = await self._admit(rid, "stream_text", [stage], priority)
        err = None
        try:
            events = self._text_events(stage, reqs, ticket)
            async for _, d in cancellable(events, ticket.cancelled, self.config.app.request_timeout_s):
                if d["text"]:
                    yield d["text"]
        except BaseException as e:
            err = e
            raise
        finally:
            await ticket.release(err)

    def _handle_text_body(self, prompt, messages, **kw):
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
        if messages is not None:
            body = _validated(ChatCompletionRequest, messages=messages, **kw)
            return body, [{"messages": body.chat_messages()}]
        body = _validated(CompletionRequest, prompt=prompt, **kw)
        return body, [{"prompt": p} for p in body.prompts()[:1]]

    async def generate_images(self, prompt: str, *, model: str | None = None, n: int = 1, size: str | None = None,
                              num_inference_steps: int | None = None, guidance_scale: float | None = None,
                              seed: int | None = None, negative_prompt: str | None = None, cache: Any = None,
                              output_format: str = "png", priority: str = "normal") -> dict:
        """Images for a prompt: ``{"images": [PNG bytes] | [PIL.Image], "stages": [...], "model"}``."""
        body = _validated(ImageGenerationRequest, prompt=prompt, model=model, n=n, size=size,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                          negative_prompt=negative_prompt, cache=cache, priority=priority)
        name, pipe = self._image_pipeline(model)
        args = StageArgs(image=body.diffusion())
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        res = await self._run_collect(new_id("handle"), "images", pipe, prompt, args, priority)
        return {"model": name, "images": _images_as(res["images"], output_format), "stages": res["stages"]}

    async def run_pipeline(self, name: str, prompt: str, *, output_format: str = "png", priority: str = "normal",
                           **stage_args) -> dict:
        """Run a pipeline: ``{"text", "images", "hidden_states" (metadata), "stages", "usage"}``.
        ``stage_args``: max_tokens, temperature, seed, size, num_inference_steps, ..., stage_args={stage: {...}}."""
        pipe = self._pipeline(name)
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string", param="prompt")
        if priority not in ("high", "normal", "low"):
            raise InvalidRequestError(f"priority must be high, normal or low, got {priority!r}", param="priority")
        args = split_stage_args(stage_args)
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        res = await self._run_collect(new_id("handle"), name, pipe, prompt, args, priority)
        out = self._public(res, images=lambda pngs: _images_as(pngs, output_format)) | {"pipeline": name}
        out.pop("type")
        return out

    async def cancel(self, request_id: str) -> bool:
        """Cancel a live request by id through the scheduler (False if unknown or finished)."""
        return await self.admission.cancel(request_id)

    async def stats(self) -> dict:
        """Each stage's engine stats (from one replica per stage)."""
        keys = list(self.handles)
        vals = await asyncio.gather(*(self.handles[k].stats.remote() for k in keys))
        return dict(zip(keys, vals))
