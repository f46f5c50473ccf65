"""OpenAI's audio replies, built from the pipeline runner's events (omni_ray/runner.py):
``{"type": "text", "delta"}`` (the thinker's text), ``{"type": "audio", "pcm", "sample_rate"}``
(float32 chunks, in order) and the final ``{"type": "result", "text", "audio": {"samples",
"sample_rate", "voice"}, "usage", "stages"}``; other events (stage_start, stage_end, progress) carry
nothing for the client.

* a chat completion's ``message.audio``: ``{id, data (base64 of the whole file), expires_at,
  transcript}`` with ``content`` null, as OpenAI answers an audio request;
* its stream: ``delta.audio`` with ``transcript`` deltas and ``data`` chunks (base64 pcm16, as made),
  each with the audio's ``id``; then ``{id, expires_at}``, the finish chunk and ``[DONE]``;
* ``/v1/audio/speech``: the file's bytes as they are encoded, or (``stream_format: sse``)
  ``speech.audio.delta`` events (``audio``: base64 of the next bytes) and one ``speech.audio.done``
  (``usage``: input, output and total tokens).

Audio is not kept: ``expires_at`` is the reply's creation time (a later request cannot refer to it).
"""

from __future__ import annotations

import base64
import time
import uuid

from deployments.openai.responses import finish
from omni_ray.media.audio_out import AudioStreamEncoder, encode_audio, to_pcm16


def audio_id() -> str:
    return f"audio_{uuid.uuid4().hex[:24]}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def finish_reason(result: dict) -> str:
    """The thinker's finish reason (the first step that reports one): ``stop`` or ``length``."""
    return finish(next((s["finish_reason"] for s in result.get("stages") or [] if s and s.get("finish_reason")),
                       "stop"))


def chat_usage(result: dict) -> dict:
    use = dict(result.get("usage") or {})
    use.setdefault("prompt_tokens", 0)
    use.setdefault("completion_tokens", 0)
    use["total_tokens"] = use["prompt_tokens"] + use["completion_tokens"]
    return use


def chat_audio_body(rid: str, model: str, result: dict, fmt: str, created: int | None = None) -> dict:
    """A ``chat.completion`` whose message is the audio (whole file in ``fmt``) and its transcript."""
    created = int(time.time()) if created is None else created
    audio = result["audio"]
    message = {"role": "assistant", "content": None, "refusal": None,
               "audio": {"id": audio_id(), "data": b64(encode_audio(audio["samples"], audio["sample_rate"], fmt)),
                         "expires_at": created, "transcript": result["text"] or ""}}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": chat_usage(result)}


class ChatAudioChunks:
    """The ``chat.completion.chunk`` dicts of one streamed audio reply, event by event."""

    def __init__(self, rid: str, model: str, include_usage: bool, created: int | None = None):
        self.id, self.model, self.include_usage = rid, model, include_usage
        self.created = int(time.time()) if created is None else created
        self.audio_id = audio_id()

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def first(self) -> dict:
        return self._chunk({"role": "assistant", "content": None, "refusal": None})

    def of(self, ev: dict) -> list[dict]:
        """The chunks an event gives (none for events without client data)."""
        if ev["type"] == "text" and ev["delta"]:
            return [self._chunk({"audio": {"id": self.audio_id, "transcript": ev["delta"]}})]
        if ev["type"] == "audio" and len(ev["pcm"]):
            return [self._chunk({"audio": {"id": self.audio_id, "data": b64(to_pcm16(ev["pcm"]))}})]
        if ev["type"] == "result":
            out = [self._chunk({"audio": {"id": self.audio_id, "expires_at": self.created}}),
                   self._chunk({}, finish_reason(ev))]
            if self.include_usage:
                out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": chat_usage(ev)})
            return out
        return []


class SpeechBytes:
    """The bytes of a ``/v1/audio/speech`` reply in ``fmt``, event by event: as they are encoded for a
    format that streams, else the whole file with the result."""

    def __init__(self, fmt: str, streamed: bool):
        self.fmt, self.streamed = fmt, streamed
        self.encoder: AudioStreamEncoder | None = None

    def of(self, ev: dict) -> bytes:
        if ev["type"] == "audio" and self.streamed and len(ev["pcm"]):
            if self.encoder is None:
                self.encoder = AudioStreamEncoder(self.fmt, ev["sample_rate"])
            return self.encoder.write(ev["pcm"])
        if ev["type"] == "result":
            audio = ev["audio"]
            if self.encoder is None:              # not streamed, or no chunk came before the result
                return encode_audio(audio["samples"], audio["sample_rate"], self.fmt)
            return self.encoder.close()
        return b""


def speech_usage(result: dict) -> dict:
    use = chat_usage(result)
    return {"input_tokens": use["prompt_tokens"], "output_tokens": use["completion_tokens"],
            "total_tokens": use["total_tokens"]}
