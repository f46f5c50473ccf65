"""The ingress: OpenAI-compatible HTTP API and typed Python methods over the stage deployments.

HTTP (FastAPI; every path but /health needs ``Authorization: Bearer <key>`` when app.api_keys is
set; keys, body size and stray exceptions are handled by the Gate middleware before FastAPI parses
a body, the other limits by the routes before any stage is called):
    GET  /health  /info  /v1/models  /v1/pipelines
    POST /v1/completions  /v1/chat/completions  /v1/images/generations
    POST /v1/pipelines/{name}     (or /v1/pipelines/run with a "pipeline" field; "stream": true for SSE)
    POST /generate                (vLLM-omni's route: the same runner, pipeline and stage_args optional)
    POST /v1/requests/{id}/cancel (through the omni scheduler)

Python (``serve.get_app_handle("omni")``): see handle_api.py.

Every request is admitted by the omni scheduler (when enabled), carries one request id to every
stage, and is cancelled downstream when the client goes away.
"""

import asyncio
import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray import serve

from deployments.gate import OPEN_PATHS, Gate, GateSettings
from deployments.handle_api import HandleAPI
from deployments.http import SSE_HEADERS, error_response, install_handlers
from deployments.ingress_core import IngressCore, new_id
from deployments.openapi_doc import install_openapi
from deployments.openai_format import Chat, Completion, b64_images, usage
from deployments.protocol import (ChatCompletionRequest, CompletionRequest, GenerateRequest, ImageGenerationRequest,
                                  PipelineRequest, check_pipeline_limits, check_text_limits)
from deployments.streams import gather_or_cancel
from omni_ray.errors import InvalidRequestError, RequestTimeoutError
from omni_ray.pipeline import StageArgs

app = FastAPI(title="omni-ray", description="OpenAI-compatible serving of multi-stage omni models")
install_handlers(app)
install_openapi(app, OPEN_PATHS)
app.add_middleware(Gate)


@serve.deployment
@serve.ingress(app)
class Ingress(HandleAPI, IngressCore):
    """HTTP routes; the machinery is in IngressCore, the Python methods in HandleAPI."""

    def __serve_build_asgi_app__(self):
        """Called by Serve after __init__: hand this replica's keys and limits to the Gate, and its
        config to the OpenAPI document (limits and pipeline names)."""
        self.app.state.gate = GateSettings.from_app(self.config.app)
        self.app.state.omni_config = self.config
        self.app.openapi_schema = None
        return self.app

    # ================================================================== text
    async def _text(self, body, prompts: list[dict], fmt_cls, max_new, logprobs: bool):
        stage = self._stage(body.model, "ar")
        check_text_limits(body, max_new, self.limits)
        rid = new_id("chatcmpl" if fmt_cls is Chat else "cmpl")
        fmt = fmt_cls(rid, self.names[stage], logprobs)
        reqs = self._text_requests(rid, prompts, body, max_new, logprobs)
        kind = "chat" if fmt_cls is Chat else "completions"
        if not body.stream:
            choices = await self._unary(rid, kind, [stage], body.priority,
                                        lambda t: self._collect(stage, reqs, t))
            return fmt.body(choices, usage(choices, {c.index // body.n: c.prompt_tokens for c in choices}))
        return await self._stream(rid, kind, [stage], body.priority,
                                  lambda t: self._text_events(stage, reqs, t), lambda ev: True,
                                  lambda events: self._render_text(fmt, body, [i for i, _ in reqs], events))

    def _respond(self, result) -> Any:
        if isinstance(result, dict):
            return result
        return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        prompts = [{"prompt": p} for p in body.prompts()]
        return self._respond(await self._text(body, prompts, Completion, body.max_tokens,
                                              body.logprobs is not None))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        prompts = [{"messages": body.chat_messages()}]
        return self._respond(await self._text(body, prompts, Chat, body.max_new_tokens,
                                              body.logprobs))

    # ================================================================== pipelines and images
    @app.post("/v1/pipelines/{name}")
    async def pipelines_run(self, name: str, body: PipelineRequest):
        if name == "run" and "run" not in self.config.pipelines:
            if not body.pipeline:
                raise InvalidRequestError("POST /v1/pipelines/run needs a 'pipeline' field", param="pipeline")
            name = body.pipeline
        pipe = self._pipeline(name)
        args = StageArgs(text=body.text_args(), image=body.diffusion(), per_stage=body.stage_args)
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        rid = new_id("pipe")
        if not body.stream:
            res = await self._run_collect(rid, name, pipe, body.prompt, args, body.priority)
            out = {"id": rid, "object": "pipeline.result", "created": int(time.time()), "pipeline": name,
                   **self._public(res)}
            out.pop("type")
            return out
        return self._respond(await self._stream(
            rid, name, [s.stage for s in pipe.steps], body.priority,
            lambda t: self._pipeline_events(rid, pipe, body.prompt, args, t),
            lambda ev: ev["type"] != "stage_start",          # up to the first stage's first output
            lambda events: self._render_pipeline(rid, name, events)))

    @app.post("/generate")
    async def generate(self, body: GenerateRequest):
        return await self.pipelines_run(*body.to_pipeline(self.config.pipelines))

    @app.post("/v1/images/generations")
    async def images_generations(self, body: ImageGenerationRequest):
        name, pipe = self._image_pipeline(body.model)
        args = StageArgs(image=body.diffusion())
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        res = await self._run_collect(new_id("img"), "images", pipe, body.prompt, args, body.priority)
        return {"created": int(time.time()), "data": b64_images(res["images"]), "model": name}

    @app.post("/v1/requests/{request_id}/cancel")
    async def cancel_request(self, request_id: str):
        """Cancel a running request by id (the ``id`` of its response / stream chunks), through the
        scheduler, whichever ingress replica owns it."""
        if not self.admission.enabled:
            raise InvalidRequestError("cancellation by id needs the omni scheduler (scheduler.enabled)")
        return {"id": request_id, "cancelled": await self.admission.cancel(request_id)}

    # ================================================================== info
    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [
            {"id": self.names[k], "object": "model", "created": 0, "owned_by": "omni-ray",
             "stage": k, "kind": self.kinds[k]} for k in self.kinds]}

    @app.get("/v1/pipelines")
    async def pipelines(self):
        return {"object": "list", "data": [
            {"id": n, "object": "pipeline", "description": p.description,
             "steps": [s.model_dump(exclude_none=True) for s in p.steps]} for n, p in self.config.pipelines.items()]}

    @app.get("/health")
    async def health(self):
        async def check(k: str):
            await self.handles[k].health.remote()

        try:
            async with asyncio.timeout(10):
                await gather_or_cancel(check(k) for k in self.handles)
        except Exception as err:  # noqa: BLE001
            return error_response(err if not isinstance(err, TimeoutError) else
                                  RequestTimeoutError("stage health check timed out"))
        return {"status": "ok"}

    @app.get("/info")
    async def info(self):
        return await self.describe()

    async def __del__(self):
        await self.admission.close()
