"""The ingress: OpenAI-compatible HTTP API and typed Python methods over the stage deployments.

HTTP (FastAPI; every path but /health needs ``Authorization: Bearer <key>`` when app.api_keys is
set; keys, body size and stray exceptions are handled by the Gate middleware before FastAPI parses
a body, the other limits by the routes before any stage is called):
    GET  /health  /info  /v1/models  /v1/models/{id}  /v1/pipelines
    POST /v1/completions  /v1/chat/completions  /v1/images/generations
    POST /v1/audio/speech         (text to speech; chat completions with modalities ["text", "audio"]: speech.py)
    POST /v1/images/edits         (OpenAI's multipart form: image file + prompt; models that edit images)
    POST /v1/pipelines/{name}     (or /v1/pipelines/run with a "pipeline" field; "stream": true for SSE)
    POST /generate                (vLLM-omni's route: the same runner, pipeline and stage_args optional)
    POST /v1/requests/{id}/cancel (through the omni scheduler)
    POST /v1/videos, GET /v1/videos[/{id}[/content]], DELETE /v1/videos/{id}   (video jobs: videos.py)

Python, for other Ray apps (``serve.get_app_handle("omni")``):
    h = serve.get_app_handle("omni")
    await h.generate_text.remote("Hello", max_tokens=16)            -> {"text", "token_ids", "usage", ...}
    h.options(stream=True).stream_text.remote("Hello")               -> text deltas
    await h.generate_images.remote("a fox", size="64x64")            -> {"images": [PNG bytes | PIL], ...}
    await h.run_pipeline.remote("text2image", "a fox", max_tokens=8) -> {"text", "images", "stages", ...}
Arguments are validated by the same request models as the HTTP API; errors arrive as the same
typed exceptions (InvalidRequestError, ModelNotFoundError, QueueFullError, ...).

Every request is admitted by the omni scheduler (when enabled), carries one request id to every
stage, and is cancelled downstream when the client goes away (``lifecycle.py``).
"""

import asyncio
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.ingress.admission import Admission
from deployments.ingress.catalog import Catalog
from deployments.ingress.gate import OPEN_PATHS, Gate, GateSettings
from deployments.ingress.handle_args import images_as, text_body, validated
from deployments.ingress.http import SSE_HEADERS, health_response, install_handlers
from deployments.ingress.info import describe
from deployments.ingress.input_image import EDIT_OPENAPI, input_image, read_form
from deployments.ingress.lifecycle import Lifecycle, new_id
from deployments.ingress.limits import check_pipeline_limits, check_text_limits
from deployments.ingress.openapi_doc import install_openapi
from deployments.ingress.pipelines import pipeline_events, pipeline_result, public, render_pipeline
from deployments.ingress.remote_stages import remote_backends
from deployments.ingress.request_ids import RequestIds
from deployments.ingress.speech import SPEECH_OPENAPI, SpeechRoutes
from deployments.ingress.stage_health import StageHealth
from deployments.ingress.text import collect, render_text, text_events, text_requests
from deployments.ingress.videos import VideoJobs
from deployments.openai.audio import SpeechRequest
from deployments.openai.image_edits import parse_edit_form
from deployments.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    ImageGenerationRequest,
    PipelineRequest,
)
from deployments.openai.responses import Chat, Completion, b64_images, usage
from deployments.openai.tool_calls import ToolChat
from deployments.openai.tools import ToolCalling
from deployments.openai.videos import VideoGenerationRequest
from deployments.services import dit_cache
from deployments.streams import OpenStreams, cancellable
from omni_ray.config import OmniConfig, PipelineConfig, validate
from omni_ray.errors import InvalidRequestError
from omni_ray.rules import check_text
from omni_ray.runner import StageArgs, check_image
from omni_ray.stages.requests import ImageInput

app = FastAPI(title="omni-ray", description="OpenAI-compatible serving of multi-stage omni models")
install_handlers(app)
install_openapi(app, OPEN_PATHS)
app.add_middleware(Gate)


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP routes and Python methods; requests run through ``Lifecycle``, stages are found by the
    ``Catalog`` and called through their ``RemoteAR`` / ``RemoteDiT`` backends."""

    def __init__(self, config: dict, stages: dict[str, DeploymentHandle]):
        self.config: OmniConfig = validate(OmniConfig, config)
        self.handles = stages
        self.catalog = Catalog(self.config)
        self.kinds, self.names = self.catalog.kinds, self.catalog.names
        cache = dit_cache({"app": self.config.app.name, "dit_cache": self.config.dit_cache.model_dump()})
        batch = self.config.app.stage_call_batch
        self.stage_health = StageHealth(stages, self.config.app.stage_health)
        self.backends = remote_backends(stages, self.catalog, self.stage_health, cache, batch)
        self.limits = self.config.app.limits
        self.admission = Admission(self.config)
        self.requests = Lifecycle(self.config.app, self.admission, OpenStreams(self.config.app.streaming))
        self.ids = RequestIds()                 # <prefix>-<X-Request-Id>, unique (request_ids.py)
        self.videos = VideoJobs(self.config, self.catalog, self.backends, self.requests, self.ids)   # /v1/videos
        self.speech = SpeechRoutes(self)                                   # audio out (speech.py)

    def __serve_build_asgi_app__(self):
        """Called by Serve after __init__: hand this replica's keys and limits to the Gate, and its
        config to the OpenAPI document (limits and pipeline names)."""
        self.app.state.gate = GateSettings.from_app(self.config.app)
        self.app.state.omni_config = self.config
        self.app.openapi_schema = None
        return self.app

    # ================================================================== runs (HTTP and Python)
    def _collect(self, stage: str, reqs):
        return lambda t: collect(self.backends[stage], stage, reqs, t)

    def _text_events(self, stage: str, reqs):
        return lambda t: text_events(self.backends[stage], stage, reqs, t)

    async def _run_collect(self, rid: str, name: str, pipe: PipelineConfig, prompt: str, args: StageArgs,
                           priority: str, image: ImageInput | None = None) -> dict:
        return await self.requests.unary(
            rid, name, [s.stage for s in pipe.steps], priority,
            lambda t: pipeline_result(self.backends, self.kinds, rid, pipe, prompt, args, t, image))

    async def _image(self, name: str, pipe: PipelineConfig, source) -> ImageInput | None:
        """The request's input image, checked and put in the object store (input_image.py); a pipeline
        that needs one gets one, one that takes none gets none."""
        check_image(name, pipe, source)
        return None if source is None else await input_image(source, self.config.app.media)

    # ================================================================== text
    def _text_prepare(self, body, prompts: list[dict], id_prefix: str):
        """(stage, params, request id, typed stage requests) of a text body, its limits checked."""
        stage = self.catalog.stage(body.model, "ar")
        check_text_limits(body, self.limits)          # this app's limits first, then the engine's rules
        params = body.to_sampling_params()
        rid = self.ids.new(id_prefix)
        return stage, params, rid, text_requests(rid, prompts, body, params)

    async def _text(self, body, prompts: list[dict], fmt_cls, tools: ToolCalling | None = None):
        stage, params, rid, reqs = self._text_prepare(body, prompts, "chatcmpl" if fmt_cls is Chat else "cmpl")
        fmt = fmt_cls(rid, self.names[stage], params.logprobs is not None, getattr(body, "echo", False))
        kind = "chat" if fmt_cls is Chat else "completions"
        fmt = fmt if tools is None else ToolChat(fmt, tools)          # messages with tool calls
        if not body.stream:
            choices = await self.requests.unary(rid, kind, [stage], body.priority, self._collect(stage, reqs))
            return fmt.body(choices, usage(choices, {c.index // body.n: c.prompt_tokens for c in choices}))
        return await self.requests.stream(rid, kind, [stage], body.priority,
                                          self._text_events(stage, reqs), lambda ev: True,
                                          lambda events: render_text(fmt, body, [i for i, _ in reqs], events))

    def _respond(self, result) -> Any:
        if isinstance(result, dict):
            return result
        return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        prompts = [{"prompt": p} for p in body.prompts()]
        return self._respond(await self._text(body, prompts, Completion))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        if body.wants_audio:                      # modalities ["text", "audio"]: the speech pipeline
            return await self.speech.chat(body)
        stage = self.catalog.stage(body.model, "ar")
        tools = body.tool_calling(self.catalog.tool_parser(stage), self.names[stage])
        prompts = [{"messages": body.chat_messages()} | ({"tools": tools.tools} if tools else {})]
        return self._respond(await self._text(body, prompts, Chat, tools))

    @app.post("/v1/audio/speech", response_class=Response, openapi_extra=SPEECH_OPENAPI)
    async def audio_speech(self, body: SpeechRequest):
        """OpenAI's text to speech on a model's speech pipeline (deployments/openai/audio.py says how)."""
        return await self.speech.speech(body)

    # ================================================================== pipelines and images
    @app.post("/v1/pipelines/{name}")
    async def pipelines_run(self, name: str, body: PipelineRequest):
        if name == "run" and "run" not in self.config.pipelines:
            if not body.pipeline:
                raise InvalidRequestError("POST /v1/pipelines/run needs a 'pipeline' field", param="pipeline")
            name = body.pipeline
        pipe = self.catalog.pipeline(name)
        check_text(body.prompt)
        args = body.to_stage_args()
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        image = await self._image(name, pipe, body.image)
        rid = self.ids.new("pipe")
        if not body.stream:
            res = await self._run_collect(rid, name, pipe, body.prompt, args, body.priority, image)
            out = {"id": rid, "object": "pipeline.result", "created": int(time.time()), "pipeline": name,
                   **public(res)}
            out.pop("type")
            return out
        return self._respond(await self.requests.stream(
            rid, name, [s.stage for s in pipe.steps], body.priority,
            lambda t: pipeline_events(self.backends, self.kinds, rid, pipe, body.prompt, args, t, image),
            lambda ev: ev["type"] != "stage_start",          # up to the first stage's first output
            lambda events: render_pipeline(rid, name, events)))

    @app.post("/generate")
    async def generate(self, body: GenerateRequest):
        return await self.pipelines_run(*body.to_pipeline(self.config.pipelines))

    @app.post("/v1/images/generations")
    async def images_generations(self, body: ImageGenerationRequest):
        name, pipe = self.catalog.image_pipeline(body.model)
        check_text(body.prompt)
        args = StageArgs(image=body.diffusion())
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        check_image(name, pipe, None)            # an edit model: 400 pointing to /v1/images/edits
        res = await self._run_collect(self.ids.new("img"), "images", pipe, body.prompt, args, body.priority)
        return {"created": int(time.time()), "data": b64_images(res["images"]), "model": name}

    @app.post("/v1/images/edits", openapi_extra=EDIT_OPENAPI)
    async def images_edits(self, request: Request):
        """OpenAI's image edit: a multipart form (deployments/openai/image_edits.py says what is honoured)."""
        body, upload = parse_edit_form(await read_form(request, self.config.app.media))
        name, pipe = self.catalog.edit_pipeline(body.model)
        check_text(body.prompt)
        args = StageArgs(image=body.diffusion())
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        image = await self._image(name, pipe, upload)
        res = await self._run_collect(self.ids.new("img"), "image_edits", pipe, body.prompt, args, body.priority,
                                      image)
        return {"created": int(time.time()), "data": b64_images(res["images"]), "model": name}

    # ================================================================== video jobs (videos.py)
    @app.post("/v1/videos")
    async def videos_create(self, body: VideoGenerationRequest):
        """A video job, answered at once (``status: queued``); poll it, then download its MP4."""
        return await self.videos.create(body)

    @app.get("/v1/videos")
    async def videos_list(self):
        return {"object": "list", "data": [self.videos.get(k) for k in list(self.videos.jobs)]}

    @app.get("/v1/videos/{video_id}")
    async def videos_get(self, video_id: str):
        return self.videos.get(video_id)

    @app.get("/v1/videos/{video_id}/content")
    async def videos_content(self, video_id: str):
        return Response(await self.videos.content(video_id), media_type="video/mp4")

    @app.delete("/v1/videos/{video_id}")
    async def videos_delete(self, video_id: str):
        """Cancel a running job (its DiT slot is freed) or delete a finished video."""
        return await self.videos.delete(video_id)

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
        return {"object": "list", "data": self.catalog.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str):
        """One model object (``client.models.retrieve(id)``); ids may contain '/'. 404 if unknown."""
        return self.catalog.model(model_id)

    @app.get("/v1/pipelines")
    async def pipelines(self):
        return {"object": "list", "data": [
            {"id": n, "object": "pipeline", "description": p.description,
             "steps": [s.model_dump(exclude_none=True) for s in p.steps]} for n, p in self.config.pipelines.items()]}

    @app.get("/health")
    async def health(self):
        """200 ``{"status": "ok"}`` when every stage has a replica that answers; else 503 naming the
        stages without one. Answers within ``app.stage_health.probe_timeout_s`` (stage_health.py)."""
        self.stage_health.start()
        return health_response(await self.stage_health.check(), self.config.app.stage_health.retry_after_s)

    @app.get("/info")
    async def info(self):
        return await self.describe()

    async def describe(self) -> dict:
        return await describe(self.config, self.handles, self.kinds, self.names, self.admission)

    # ================================================================== Python methods
    async def generate_text(self, prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
                            model: str | None = None, max_tokens: int | None = 64, temperature: float = 1.0,
                            top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                            n: int = 1, logprobs: int | bool | None = None, ignore_eos: bool = False,
                            priority: str = "normal", response_format: dict | None = None) -> dict:
        """One text generation. ``messages`` uses the chat template (content parts with images / audio
        for models that take them); ``prompt`` is raw text or token ids; ``response_format`` as the HTTP
        API's (``json_object``, ``json_schema``: the output follows it).
        Returns ``{"text", "token_ids", "finish_reason", "usage", "model"}`` (plus ``choices`` when n > 1,
        ``logprobs`` when asked: ``logprobs=k`` gives one entry per token, ``{"id", "token" (its text),
        "logprob", "bytes", "top_logprobs": [k such entries]}``)."""
        body, prompts = text_body(prompt, messages, model=model, max_tokens=max_tokens, logprobs=logprobs,
                                  temperature=temperature, top_p=top_p, seed=seed, stop=stop, n=n,
                                  ignore_eos=ignore_eos, priority=priority,
                                  **({"response_format": response_format} if response_format is not None else {}))
        stage, _, rid, reqs = self._text_prepare(body, prompts, "handle")
        choices = await self.requests.unary(rid, "generate_text", [stage], priority, self._collect(stage, reqs))
        c = choices[0]
        out = {"id": rid, "model": self.names[stage], "text": c.text, "token_ids": c.token_ids,
               "finish_reason": c.finish_reason, "usage": usage(choices, {0: c.prompt_tokens})}
        if logprobs is not None and logprobs is not False:
            out["logprobs"] = c.logprobs
        if n > 1:
            out["choices"] = [{"text": x.text, "token_ids": x.token_ids, "finish_reason": x.finish_reason}
                              for x in choices]
        return out

    async def stream_text(self, prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
                          model: str | None = None, max_tokens: int | None = 64, temperature: float = 1.0,
                          top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                          ignore_eos: bool = False, priority: str = "normal") -> AsyncIterator[str]:
        """Text deltas as they are generated (call with ``handle.options(stream=True)``)."""
        body, prompts = text_body(prompt, messages, model=model, max_tokens=max_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                                  ignore_eos=ignore_eos, priority=priority)
        stage, _, rid, reqs = self._text_prepare(body, prompts, "handle")
        ticket = await self.requests.admit(rid, "stream_text", [stage], priority)
        err = None
        try:
            events = text_events(self.backends[stage], stage, reqs, ticket)
            async for _, d in cancellable(events, ticket.cancelled, self.config.app.request_timeout_s):
                if d["text"]:
                    yield d["text"]
        except BaseException as e:
            err = e
            raise
        finally:
            await ticket.release(err)

    async def generate_images(self, prompt: str, *, model: str | None = None, n: int = 1, size: str | None = None,
                              num_inference_steps: int | None = None, guidance_scale: float | None = None,
                              seed: int | None = None, negative_prompt: str | None = None, cache: Any = None,
                              output_format: str = "png", priority: str = "normal", image: Any = None) -> dict:
        """Images for a prompt: ``{"images": [PNG bytes] | [PIL.Image], "stages": [...], "model"}``.
        ``image`` (PNG / JPEG bytes, a data URL, base64 or a PIL image): the image to edit, for a model
        that edits images (as ``/v1/images/edits``)."""
        body = validated(ImageGenerationRequest, prompt=prompt, model=model, n=n, size=size,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                         negative_prompt=negative_prompt, cache=cache, priority=priority)
        name, pipe = self.catalog.image_pipeline(model) if image is None else self.catalog.edit_pipeline(model)
        check_text(body.prompt)
        args = StageArgs(image=body.diffusion())
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        source = await self._image(name, pipe, image)
        res = await self._run_collect(new_id("handle"), "images", pipe, prompt, args, priority, source)
        return {"model": name, "images": images_as(res["images"], output_format), "stages": res["stages"]}

    async def run_pipeline(self, name: str, prompt: str, *, output_format: str = "png", priority: str = "normal",
                           image: Any = None, **stage_args) -> dict:
        """Run a pipeline: ``{"text", "images", "hidden_states" (metadata), "stages", "usage"}``.
        ``stage_args``: max_tokens, temperature, seed, size, num_inference_steps, ..., stage_args={stage: {...}};
        ``image``: the input image of a pipeline that edits one (bytes, data URL, base64 or PIL)."""
        pipe = self.catalog.pipeline(name)
        check_text(prompt)
        if priority not in ("high", "normal", "low"):
            raise InvalidRequestError(f"priority must be high, normal or low, got {priority!r}", param="priority")
        args = StageArgs.from_kwargs(stage_args)
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        source = await self._image(name, pipe, image)
        res = await self._run_collect(new_id("handle"), name, pipe, prompt, args, priority, source)
        out = public(res, images=lambda pngs: images_as(pngs, output_format)) | {"pipeline": name}
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

    async def __del__(self):
        await self.stage_health.close()
        await self.admission.close()
