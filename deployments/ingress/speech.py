"""Audio out at the ingress: chat completions that speak, and ``POST /v1/audio/speech``.

Both run a model's speech pipeline (``Catalog.speech_pipeline``: thinker -> talker -> token2wav)
through the pipeline runner with the chat messages and ``audio={"voice": ...}``; what the request
asks is checked first (deployments/openai/audio.py), the replies are built from the runner's events
(deployments/openai/audio_responses.py). A client that leaves closes the event stream, which
cancels the stage calls: every stage aborts the request (lifecycle.py).
"""

from __future__ import annotations

from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from deployments.ingress.http import SSE_HEADERS, error_event, sse
from deployments.ingress.limits import check_pipeline_limits, check_text_limits
from deployments.ingress.pipelines import pipeline_events, pipeline_result
from deployments.openai.audio import SpeechRequest, check_chat_audio, check_voice, per_stage, sampling_args, seeded
from deployments.openai.audio_responses import ChatAudioChunks, SpeechBytes, b64, chat_audio_body, speech_usage
from deployments.openai.protocol import ChatCompletionRequest
from omni_ray.config import PipelineConfig
from omni_ray.media.audio_out import CONTENT_TYPES
from omni_ray.runner import StageArgs

SPEECH_OPENAPI = {"responses": {"200": {"description": "the audio file's bytes, sent as they are encoded "
                                        "(stream_format audio), or speech.audio.delta / done events (sse)",
                                        "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                                    for t in sorted(set(CONTENT_TYPES.values()))}
                                        | {"text/event-stream": {}}}}}


def _ready(ev: dict) -> bool:
    return ev["type"] in ("text", "audio", "result")


async def render_chat_audio(chunks: ChatAudioChunks, events) -> AsyncIterator[str]:
    """SSE of a streamed audio reply (the Lifecycle adds ``[DONE]``, or an error event)."""
    yield sse(chunks.first())
    async for ev in events:
        for c in chunks.of(ev):
            yield sse(c)


async def render_speech(out: SpeechBytes, events) -> AsyncIterator[bytes]:
    """The reply's bytes as they come (``stream_format: audio``); a failure ends the response early."""
    async for ev in events:
        if data := out.of(ev):
            yield data


async def render_speech_sse(out: SpeechBytes, events) -> AsyncIterator[str]:
    """``speech.audio.delta`` events, then ``speech.audio.done``; a later failure: an error event."""
    try:
        async for ev in events:
            if data := out.of(ev):
                yield sse({"type": "speech.audio.delta", "audio": b64(data)})
            if ev["type"] == "result":
                yield sse({"type": "speech.audio.done", "usage": speech_usage(ev)})
    except Exception as e:                      # headers are sent: report in-band
        yield error_event(e)


class SpeechRoutes:
    """The audio routes of one ingress replica, over its catalog, backends and request lifecycle."""

    def __init__(self, ingress):
        self.catalog, self.backends, self.kinds = ingress.catalog, ingress.backends, ingress.kinds
        self.names, self.requests, self.ids = ingress.names, ingress.requests, ingress.ids
        self.limits = ingress.config.app.limits

    def _run(self, rid: str, pipe: PipelineConfig, args: StageArgs, messages: list[dict], voice: str, whole=False):
        """``work(ticket)`` of the Lifecycle: the runner's events, or (``whole``) its result."""
        run = pipeline_result if whole else pipeline_events
        return lambda t: run(self.backends, self.kinds, rid, pipe, None, args, t, messages=messages,
                             audio={"voice": voice})

    async def chat(self, body: ChatCompletionRequest):
        """A chat completion with ``modalities: ["text", "audio"]``: the reply (a dict) or its SSE stream."""
        stage = self.catalog.stage(body.model, "ar")
        name, pipe = self.catalog.speech_pipeline(stage, param="modalities")
        check_chat_audio(body, self.catalog.voices(pipe))
        check_text_limits(body, self.limits)
        body.to_sampling_params()                           # the engine's rules, with the field's name
        seed = seeded(body.seed)
        args = StageArgs(text=dict(seed), image=dict(seed),
                         per_stage=per_stage(pipe.steps[0].stage, sampling_args(body), body.stage_args))
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        rid, messages, stages = self.ids.new("chatcmpl"), body.chat_messages(), [s.stage for s in pipe.steps]
        voice = body.audio.voice
        if not body.stream:
            res = await self.requests.unary(rid, "chat", stages, body.priority,
                                            self._run(rid, pipe, args, messages, voice, whole=True))
            return chat_audio_body(rid, self.names[stage], res, body.audio.format)
        chunks = ChatAudioChunks(rid, self.names[stage], body.include_usage)
        sse_stream = await self.requests.stream(rid, "chat", stages, body.priority,
                                                self._run(rid, pipe, args, messages, voice), _ready,
                                                lambda evs: render_chat_audio(chunks, evs))
        return StreamingResponse(sse_stream, media_type="text/event-stream", headers=SSE_HEADERS)

    async def speech(self, body: SpeechRequest) -> StreamingResponse:
        """``POST /v1/audio/speech``: the audio's bytes as they are made, or SSE events."""
        body.check()
        name, pipe = self.catalog.speech_pipeline(body.model, param="model")
        voice = check_voice(body.voice, self.catalog.voices(pipe), "voice")
        seed = seeded(body.seed)
        args = StageArgs(text=dict(seed), image=dict(seed),
                         per_stage=per_stage(pipe.steps[0].stage, body.thinker_args(self.limits.max_tokens),
                                             body.stage_args))
        check_pipeline_limits(name, pipe, self.kinds, args, self.limits)
        rid, messages, stages = self.ids.new("speech"), body.messages(), [s.stage for s in pipe.steps]
        out = SpeechBytes(body.response_format, body.streamed)
        sse_out = body.stream_format == "sse"
        render = (lambda evs: render_speech_sse(out, evs)) if sse_out else (lambda evs: render_speech(out, evs))
        it = await self.requests.stream(rid, "speech", stages, body.priority,
                                        self._run(rid, pipe, args, messages, voice), _ready, render, raw=True)
        if sse_out:
            return StreamingResponse(it, media_type="text/event-stream", headers=SSE_HEADERS)
        return StreamingResponse(it, media_type=CONTENT_TYPES[body.response_format])
