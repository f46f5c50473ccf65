"""Audio out through the OpenAI API, without Ray: what a request may ask (400s naming the field),
and the replies built from fake runner events, parsed with the real ``openai`` package's types and
decoded back to the samples."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from deployments.ingress.speech import render_chat_audio, render_speech, render_speech_sse
from deployments.openai.audio import SPEECH_TEMPLATE, SpeechRequest, check_chat_audio, sampling_args, seeded
from deployments.openai.audio_responses import ChatAudioChunks, SpeechBytes, chat_audio_body
from deployments.openai.protocol import ChatCompletionRequest
from omni_ray.errors import InvalidRequestError
from omni_ray.media.audio_out import to_pcm16

MSG = [{"role": "user", "content": "Hi"}]
AUDIO = {"modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "wav"}}
VOICES = ["Chelsie", "Ethan"]
RATE = 24000
Q = 1.5 / 32768


def chunks_of(seconds=0.3, n=4, seed=0) -> list[np.ndarray]:
    x = (0.4 * np.random.default_rng(seed).standard_normal(int(RATE * seconds))).clip(-1, 1).astype(np.float32)
    return np.array_split(x, n)


def events(parts: list[np.ndarray], text=("Hel", "lo", " there")) -> list[dict]:
    """What the runner yields for a spoken reply: text deltas and audio chunks interleaved, then the result."""
    out: list[dict] = [{"type": "stage_start", "step": 0, "stage": "thinker"}]
    for i, p in enumerate(parts):
        if i < len(text):
            out.append({"type": "text", "step": 0, "stage": "thinker", "delta": text[i]})
        out.append({"type": "audio", "pcm": p, "sample_rate": RATE})
    out.append({"type": "result", "text": "".join(text), "audio": {"samples": np.concatenate(parts),
                                                                     "sample_rate": RATE, "voice": "Chelsie"},
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
                "stages": [{"step": 0, "stage": "thinker", "finish_reason": "length"}, {"step": 1, "stage": "talker"}]})
    return out


async def aiter(items):
    for x in items:
        yield x


def collect(agen) -> list:
    async def run():
        return [x async for x in agen]
    return asyncio.run(run())


def body(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MSG, **(AUDIO | kw))


def refused_chat(**kw) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        check_chat_audio(ChatCompletionRequest(messages=MSG, **kw), VOICES)
    assert e.value.http_status == 400
    return e.value


# ----------------------------------------------------------------------------- chat requests
def test_text_only_requests_do_not_ask_for_audio():
    assert not ChatCompletionRequest(messages=MSG).wants_audio
    assert not ChatCompletionRequest(messages=MSG, modalities=["text"]).wants_audio
    assert body().wants_audio and ChatCompletionRequest(messages=MSG, audio=AUDIO["audio"]).wants_audio


@pytest.mark.parametrize("kw,param", [
    ({"modalities": ["text", "audio"]}, "audio"),
    ({"audio": {"voice": "Chelsie", "format": "wav"}}, "modalities"),
    (AUDIO | {"audio": {"voice": "alloy", "format": "wav"}}, "audio.voice"),
    (AUDIO | {"audio": {"voice": {"id": "voice_1234"}, "format": "wav"}}, "audio.voice"),
    (AUDIO | {"stream": True}, "audio.format"),
    (AUDIO | {"n": 2}, "n"),
    (AUDIO | {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
     "tools"),
    (AUDIO | {"logprobs": True}, "logprobs"),
    (AUDIO | {"response_format": {"type": "json_object"}}, "response_format"),
    (AUDIO | {"guided_regex": "a+"}, "guided_regex"),
])
def test_chat_audio_refusals_name_the_field(kw, param):
    assert refused_chat(**kw).param == param


def test_chat_audio_accepts_what_it_serves():
    for fmt in ("wav", "aac", "mp3", "flac", "opus", "pcm16"):
        check_chat_audio(body(audio={"voice": "Ethan", "format": fmt}), VOICES)
    check_chat_audio(body(audio={"voice": "Ethan", "format": "pcm16"}, stream=True), VOICES)
    check_chat_audio(body(modalities=["audio"]), VOICES)
    check_chat_audio(body(audio={"voice": "any", "format": "wav"}), None)      # voices unknown here: the stage checks
    req = body(audio={"voice": "ethan", "format": "wav"})
    check_chat_audio(req, VOICES)
    assert req.audio.voice == "Ethan"                              # the checkpoint's name, as the stages resolve it


def test_a_format_openai_does_not_define_is_400():
    from pydantic import ValidationError

    from deployments.ingress.http import validation_message

    with pytest.raises(ValidationError) as e:
        body(audio={"voice": "Chelsie", "format": "ogg"})
    assert validation_message(e.value.errors())[1] == "audio.format"           # the 400's param


def test_a_previous_audio_reply_in_the_history_is_400():
    req = ChatCompletionRequest(messages=MSG + [{"role": "assistant", "audio": {"id": "audio_1"}}, *MSG])
    with pytest.raises(InvalidRequestError) as e:
        req.chat_messages()
    assert e.value.param == "messages.1.audio"


def test_sampling_goes_to_the_thinker_and_the_seed_to_every_stage():
    req = body(temperature=0.5, top_p=0.9, max_completion_tokens=7, seed=3, stop=["x"])
    assert sampling_args(req) == {"temperature": 0.5, "top_p": 0.9, "top_k": -1, "min_p": 0.0, "max_tokens": 7,
                                  "stop": ["x"], "ignore_eos": False}
    assert seeded(3) == {"seed": 3} and seeded(None) == {}


# ----------------------------------------------------------------------------- chat replies
@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_a_chat_reply_is_openais_audio_message(fmt):
    parts = chunks_of()
    out = chat_audio_body("chatcmpl-1", "tiny-omni", events(parts)[-1], fmt, created=1000)
    json.dumps(out)
    parsed = ChatCompletion.model_validate(out)
    msg = parsed.choices[0].message
    assert msg.content is None and msg.audio.transcript == "Hello there" and msg.audio.id.startswith("audio_")
    assert msg.audio.expires_at == 1000 and parsed.choices[0].finish_reason == "length"
    assert parsed.usage.total_tokens == 10
    y, rate = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)), dtype="float32")
    assert rate == RATE
    x = np.concatenate(parts)
    if fmt == "mp3":
        assert y.size >= x.size                    # lossy: the codec's delay; decoded in test_audio_out
    else:
        np.testing.assert_allclose(y, x, atol=Q, rtol=0)


def test_a_streamed_chat_reply_is_openais_chunks():
    parts = chunks_of()
    fmt = ChatAudioChunks("chatcmpl-1", "tiny-omni", include_usage=True, created=1000)
    sse = collect(render_chat_audio(fmt, aiter(events(parts))))
    chunks = [ChatCompletionChunk.model_validate(json.loads(s.removeprefix("data: "))) for s in sse]
    assert all(s.startswith("data: ") and s.endswith("\n\n") for s in sse)
    first, *mid, end_audio, finish, use = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content is None
    deltas = [c.choices[0].delta.audio for c in mid]
    assert all(d is not None and d.id == fmt.audio_id for d in deltas)
    assert "".join(d.transcript or "" for d in deltas) == "Hello there"
    pcm = b"".join(base64.b64decode(d.data) for d in deltas if d.data)
    assert pcm == to_pcm16(np.concatenate(parts))
    assert [d.data is not None for d in deltas].count(True) == len(parts)          # one data chunk per chunk made
    assert end_audio.choices[0].delta.audio.expires_at == 1000 and end_audio.choices[0].delta.audio.data is None
    assert finish.choices[0].finish_reason == "length" and finish.choices[0].delta.audio is None
    assert use.choices == [] and use.usage.completion_tokens == 3
    assert {c.id for c in chunks} == {"chatcmpl-1"}


def test_without_include_usage_no_usage_chunk():
    fmt = ChatAudioChunks("c", "m", include_usage=False)
    last = collect(render_chat_audio(fmt, aiter(events(chunks_of()))))[-1]
    assert json.loads(last.removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


# ----------------------------------------------------------------------------- /v1/audio/speech
def speech(**kw) -> SpeechRequest:
    return SpeechRequest(**({"input": "Hello world", "voice": "Chelsie"} | kw))


@pytest.mark.parametrize("kw,param", [
    ({"speed": 1.5}, "speed"),
    ({"input": "x" * 4097}, "input"),
    ({"input": "   "}, "input"),
])
def test_speech_refusals_name_the_field(kw, param):
    with pytest.raises(InvalidRequestError) as e:
        speech(**kw).check()
    assert e.value.param == param


def test_speech_instructions_are_refused():
    with pytest.raises(InvalidRequestError) as e:
        speech(instructions="whisper")
    assert e.value.param == "instructions"
    speech(instructions="").check()


def test_speech_defaults_are_openais():
    req = speech()
    assert req.response_format == "mp3" and req.stream_format == "audio" and req.speed == 1.0 and req.streamed
    assert not speech(response_format="flac").streamed
    assert req.messages() == [{"role": "user", "content": SPEECH_TEMPLATE.format(input="Hello world")}]
    assert req.thinker_args(4096) == {"temperature": 0.0, "max_tokens": 2 * 11 + 16}
    assert req.thinker_args(20)["max_tokens"] == 20 and speech(max_tokens=5).thinker_args(20)["max_tokens"] == 5


@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3", "flac"])
def test_speech_bytes_come_as_made_and_decode_to_the_audio(fmt):
    parts = chunks_of(0.5, 5)
    out = SpeechBytes(fmt, speech(response_format=fmt).streamed)
    pieces = collect(render_speech(out, aiter(events(parts))))
    assert len(pieces) >= (1 if fmt == "flac" else 3)
    data = b"".join(pieces)
    if fmt == "pcm":
        assert data == to_pcm16(np.concatenate(parts))
        return
    y, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == RATE
    if fmt != "mp3":
        np.testing.assert_allclose(y, np.concatenate(parts), atol=1.5 * Q, rtol=0)


def test_speech_sse_events_are_openais():
    parts = chunks_of()
    lines = collect(render_speech_sse(SpeechBytes("pcm", True), aiter(events(parts))))
    evs = [json.loads(s.removeprefix("data: ")) for s in lines]
    assert [e["type"] for e in evs] == ["speech.audio.delta"] * len(parts) + ["speech.audio.done"]
    assert b"".join(base64.b64decode(e["audio"]) for e in evs[:-1]) == to_pcm16(np.concatenate(parts))
    assert evs[-1]["usage"] == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}


def test_speech_sse_reports_a_later_failure_in_band():
    async def failing():
        yield {"type": "audio", "pcm": np.zeros(100, np.float32), "sample_rate": RATE}
        raise InvalidRequestError("boom", param="voice")

    lines = collect(render_speech_sse(SpeechBytes("pcm", True), failing()))
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["param"] == "voice"


def test_stage_args_go_to_the_speech_stages_only():
    from deployments.openai.audio import per_stage

    with pytest.raises(InvalidRequestError) as e:
        ChatCompletionRequest(messages=MSG, stage_args={"talker": {"max_tokens": 4}})
    assert e.value.param == "stage_args"
    got = per_stage("thinker", {"temperature": 0.5, "max_tokens": 8},
                    {"talker": {"max_tokens": 4}, "thinker": {"max_tokens": 2}})
    assert got == {"talker": {"max_tokens": 4}, "thinker": {"temperature": 0.5, "max_tokens": 2}}
    assert per_stage("thinker", {"temperature": 0.0}, None) == {"thinker": {"temperature": 0.0}}
