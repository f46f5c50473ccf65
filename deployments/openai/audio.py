"""Audio out through the OpenAI API: what a request asks for, checked before any stage runs.

* ``/v1/chat/completions`` with ``modalities: ["text", "audio"]`` and ``audio: {voice, format}``
  (``check_chat_audio``): the model's speech pipeline (its thinker -> talker -> token2wav) runs on
  the chat messages; the reply is the audio and its transcript (responses: audio_responses.py).
* ``/v1/audio/speech`` (``SpeechRequest``): text to speech on the same pipeline. Qwen2.5-Omni has no
  text-to-speech mode: its talker speaks what its thinker says. The input therefore goes to the
  thinker as one user message asking it to repeat the text word for word (``SPEECH_TEMPLATE``),
  sampled greedily; the audio is the thinker's reading, which on a trained checkpoint is the text
  (an untrained one says whatever it says). The thinker's text is not returned.

What cannot be honoured is a 400 naming the field: an unknown voice (the voices are the
checkpoint's, ``spk_dict.pt``: Chelsie and Ethan for Qwen2.5-Omni-7B), custom voice objects, a
streamed chat reply in a format other than pcm16, ``n`` > 1, tools, structured outputs and
logprobs with audio, ``speed`` other than 1.0, ``instructions``.

Extension (both routes): ``stage_args`` ``{stage: {...}}`` as ``/v1/pipelines/{name}`` takes it, for the
stages of the speech pipeline: the talker's sampling (``max_tokens``, ``temperature``; default: its
checkpoint's generation config) and token2wav's ``num_inference_steps`` / ``guidance_scale``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from deployments.openai.protocol import ChatCompletionRequest, Priority, _Body, _unset, bounded
from omni_ray.ar.sampling_params import SAMPLING_RULES
from omni_ray.errors import InvalidRequestError
from omni_ray.media.audio_out import STREAM_FORMATS
from omni_ray.stages.voices import resolve_voice

SPEECH_TEMPLATE = "Repeat the following text exactly, word for word, and say nothing else:\n\n{input}"
MAX_SPEECH_INPUT = 4096                      # characters, as OpenAI's
SPEECH_REFUSED = {
    "instructions": (_unset(), "instructions is not supported: the voice is set by `voice` only"),
}


def check_voice(voice: Any, voices: list[str] | None, param: str) -> str:
    """The checkpoint's name of ``voice`` (exact, or its one case-insensitive match, as the stages resolve
    it) from ``voices`` (None: not known here; the stages check it)."""
    if isinstance(voice, dict):
        raise InvalidRequestError(f"custom voice objects are not supported; voices: {voices}", param=param)
    if voices is None:
        return voice
    try:
        return resolve_voice(voices, voice)
    except InvalidRequestError as e:
        raise InvalidRequestError(e.message, param=param) from None


def check_chat_audio(body: ChatCompletionRequest, voices: list[str] | None) -> None:
    """A chat request that asks for audio (``body.wants_audio``): 400 naming the field for what this
    server cannot give with it."""
    if "audio" not in (body.modalities or []):
        raise InvalidRequestError('audio is set but modalities does not ask for it: send modalities: '
                                  '["text", "audio"]', param="modalities")
    if body.audio is None:
        raise InvalidRequestError('modalities asks for audio: give audio: {"voice": ..., "format": ...}',
                                  param="audio")
    body.audio.voice = check_voice(body.audio.voice, voices, "audio.voice")
    if body.stream and body.audio.format != "pcm16":
        raise InvalidRequestError(f"a streamed audio reply is pcm16, got format {body.audio.format!r}",
                                  param="audio.format")
    if body.n != 1:
        raise InvalidRequestError("n must be 1 with audio output", param="n")
    if body.tools:
        raise InvalidRequestError("tools are not supported with audio output", param="tools")
    if body.logprobs or body.top_logprobs is not None:
        raise InvalidRequestError("logprobs are not supported with audio output",
                                  param="logprobs" if body.logprobs else "top_logprobs")
    if body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequestError("response_format is not supported with audio output", param="response_format")
    for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(body, name) is not None:
            raise InvalidRequestError(f"{name} is not supported with audio output", param=name)


def sampling_args(body: ChatCompletionRequest) -> dict:
    """The thinker's sampling arguments of a chat body (the runner's AR step keys; the talker keeps its
    checkpoint's defaults). ``seed`` is request-wide: ``seeded``."""
    kw = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
              max_tokens=body.max_new_tokens, stop=body.stop, ignore_eos=body.ignore_eos)
    return {k: v for k, v in kw.items() if v is not None}


def seeded(seed: int | None) -> dict:
    """A request's seed, for every step (thinker, talker, token2wav's noise): StageArgs(text=, image=)."""
    return {} if seed is None else {"seed": seed}


def per_stage(thinker: str, thinker_args: dict, stage_args: dict | None) -> dict[str, dict]:
    """``StageArgs.per_stage`` of a speech run: the request's ``stage_args`` (extension: e.g. the talker's
    ``max_tokens``, token2wav's ``num_inference_steps``; checked against the pipeline's stages by the
    runner's rules), the thinker's from the request's own fields unless ``stage_args`` names them."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (stage_args or {}).items()}
    out[thinker] = thinker_args | (out.get(thinker) or {})
    return out


class SpeechRequest(_Body):
    """``POST /v1/audio/speech`` (OpenAI's SpeechCreateParams, plus ``max_tokens`` / ``seed`` /
    ``priority``). ``model``: a chat model with a speech pipeline, or the pipeline's name (None: the
    first speech pipeline)."""

    model: str | None = None
    input: str = Field(json_schema_extra={"minLength": 1, "maxLength": MAX_SPEECH_INPUT})
    voice: str | dict[str, Any]
    instructions: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    max_tokens: int | None = bounded(None, SAMPLING_RULES["max_tokens"])   # extension: the thinker's reading
    seed: int | None = bounded(None, SAMPLING_RULES["seed"])                # extension: every stage's sampling
    priority: Priority = "normal"
    stage_args: dict[str, dict[str, Any]] | None = None                     # extension: per speech stage
    refused: ClassVar[dict] = SPEECH_REFUSED

    def check(self) -> None:
        """What the route checks beyond the types: the input's length and the speed."""
        if not self.input.strip():
            raise InvalidRequestError("input is empty", param="input")
        if len(self.input) > MAX_SPEECH_INPUT:
            raise InvalidRequestError(f"input has {len(self.input)} characters; the limit is {MAX_SPEECH_INPUT}",
                                      param="input")
        if self.speed != 1.0:
            raise InvalidRequestError("speed must be 1.0 (the model speaks at its own pace)", param="speed")

    @property
    def streamed(self) -> bool:
        """Whether the bytes can leave as they are made (FLAC has its length in its header: sent whole)."""
        return self.response_format in STREAM_FORMATS

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": SPEECH_TEMPLATE.format(input=self.input)}]

    def thinker_args(self, max_tokens_limit: int) -> dict:
        """Greedy; ``max_tokens`` (default: twice the input's characters and 16 more: a reading needs
        about one token per character, never more than that) within the app's limit."""
        default = min(max_tokens_limit, 2 * len(self.input) + 16)
        return {"temperature": 0.0, "max_tokens": self.max_tokens or default}
