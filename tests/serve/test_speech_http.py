"""Speech out through `serve run serve_config.yaml` (the tiny Qwen2.5-Omni thinker -> talker -> token2wav
stages) with the real OpenAI client: a chat reply's audio decodes, the streamed pcm16 chunks make the
same audio as the whole reply, /v1/audio/speech streams a file and SSE events, bad requests are 400s
naming the field, and a client that leaves stops every stage."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import soundfile as sf

from tests.serve.conftest import app_config

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif("omni-talker" not in app_config()["stages"],
                                 reason="serve_config.yaml has no Qwen2.5-Omni speech stages")]

MODEL = "tiny-qwen2.5-omni"
STAGES = ("omni", "omni-talker", "omni-token2wav")
MSG = [{"role": "user", "content": "Say hello."}]
RATE = 24000
LSB = 1 / 32768
# a short greedy, seeded reply: the thinker's tokens, the talker's codes and token2wav's noise all fixed
FAST = {"omni-talker": {"max_tokens": 12}, "omni-token2wav": {"num_inference_steps": 2}}    # short, 2 ODE steps
KW = dict(model=MODEL, messages=MSG, max_tokens=4, temperature=0, seed=0,
          extra_body={"ignore_eos": True, "stage_args": FAST})


@pytest.fixture(scope="module")
def oai(omni_url):
    import openai

    return openai.OpenAI(base_url=omni_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768


def chat_audio(oai, fmt: str, **kw):
    return oai.chat.completions.create(**(KW | kw), modalities=["text", "audio"], audio={"voice": "Chelsie",
                                                                                          "format": fmt})


def test_a_chat_reply_speaks_as_openai_answers(oai):
    r = chat_audio(oai, "wav")
    msg = r.choices[0].message
    assert msg.content is None and msg.audio.id.startswith("audio_") and msg.audio.transcript
    y, rate = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)), dtype="float32")
    assert rate == RATE and y.ndim == 1 and y.size > 0 and np.isfinite(y).all()
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    text_only = KW | {"extra_body": {"ignore_eos": True}}
    text = oai.chat.completions.create(**text_only).choices[0].message.content   # the thinker alone
    assert text == msg.audio.transcript


def test_image_and_audio_in_text_and_audio_out(oai):
    from tests.ar.test_mm_encoders import _image, _wave

    png, wav = io.BytesIO(), io.BytesIO()
    _image(40, 56, 3).save(png, format="PNG")
    sf.write(wav, _wave(8000, 4), 16000, format="WAV")
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue())
                                                   .decode()}},
               {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode(),
                                                       "format": "wav"}},
               {"type": "text", "text": "What do you see and hear?"}]
    r = chat_audio(oai, "flac", messages=[{"role": "user", "content": content}])
    msg = r.choices[0].message
    y, rate = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)), dtype="float32")
    assert rate == RATE and y.size > 0 and msg.audio.transcript
    assert r.usage.prompt_tokens > 40                    # the image's and the audio's placeholders count


def test_streamed_pcm16_chunks_make_the_whole_reply(oai):
    whole = chat_audio(oai, "pcm16").choices[0].message.audio
    chunks = list(chat_audio(oai, "pcm16", stream=True, stream_options={"include_usage": True}))
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio is not None]
    data = [base64.b64decode(a.data) for a in audio if a.data]
    assert len(data) >= 1 and {a.id for a in audio} == {audio[0].id}
    assert "".join(a.transcript or "" for a in audio) == whole.transcript
    assert audio[-1].expires_at is not None
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 4
    streamed, full = pcm(b"".join(data)), pcm(base64.b64decode(whole.data))
    assert streamed.shape == full.shape
    np.testing.assert_allclose(streamed, full, atol=2 * LSB, rtol=0)     # batch-dependent float rounding at most


def test_speech_create_and_streaming_response(oai):
    kw = dict(model=MODEL, voice="Chelsie", input="Hello there.",
              extra_body={"seed": 0, "max_tokens": 4, "stage_args": FAST})
    whole = oai.audio.speech.create(**kw, response_format="wav")
    y, rate = sf.read(io.BytesIO(whole.content), dtype="float32")
    assert rate == RATE and y.size > 0
    with oai.audio.speech.with_streaming_response.create(**kw, response_format="pcm") as s:
        assert s.headers["content-type"].startswith("audio/pcm")
        parts = list(s.iter_bytes())
    np.testing.assert_allclose(pcm(b"".join(parts)), y, atol=2 * LSB, rtol=0)
    mp3 = oai.audio.speech.create(**kw)                                         # OpenAI's default format: mp3
    assert sf.info(io.BytesIO(mp3.content)).format == "MP3"


def test_speech_sse_events(client):
    body = {"model": MODEL, "voice": "Ethan", "input": "Hi.", "response_format": "pcm", "stream_format": "sse",
            "seed": 0, "max_tokens": 3, "stage_args": FAST}
    with client.stream("POST", "/v1/audio/speech", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"} and events[-1]["type"] == "speech.audio.done"
    assert sum(len(base64.b64decode(e["audio"])) for e in events[:-1]) > 0
    assert events[-1]["usage"]["output_tokens"] == 3


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", KW | {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
     "audio.voice"),
    ("/v1/chat/completions", KW | {"modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "wav"},
                                   "stream": True}, "audio.format"),
    ("/v1/chat/completions", KW | {"modalities": ["text", "audio"]}, "audio"),
    ("/v1/chat/completions", KW | {"modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "wav"},
                                   "n": 2}, "n"),
    ("/v1/audio/speech", {"model": MODEL, "voice": "nobody", "input": "Hi."}, "voice"),
    ("/v1/audio/speech", {"model": MODEL, "voice": "Chelsie", "input": "Hi.", "speed": 2.0}, "speed"),
    ("/v1/audio/speech", {"model": MODEL, "voice": "Chelsie", "input": "Hi.", "response_format": "ogg"},
     "response_format"),
    ("/v1/audio/speech", {"model": "tiny-qwen3", "voice": "Chelsie", "input": "Hi."}, "model"),
])
def test_bad_requests_are_400s_naming_the_field(client, path, body, param):
    body = {k: v for k, v in body.items() if k != "extra_body"} | {"ignore_eos": True}
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def busy(client) -> dict:
    stats = client.get("/info").json()["stages"]
    keys = ("num_running", "num_waiting", "num_streams", "active_requests", "waiting_requests")
    return {k: sum(stats[k]["stats"].get(f, 0) for f in keys) for k in STAGES}


def test_a_client_that_leaves_stops_every_stage(client, omni_url):
    import httpx

    body = KW | {"max_tokens": 400, "modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "pcm16"},
                 "stream": True, "ignore_eos": True, "stage_args": {"omni-talker": {"max_tokens": 600}}}
    body.pop("extra_body")
    with httpx.Client(base_url=omni_url, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while '"transcript"' not in next(lines):           # up to the first words
                pass
            assert any(busy(client).values())
    deadline = time.monotonic() + 60
    while any((b := busy(client)).values()):
        assert time.monotonic() < deadline, b
        time.sleep(0.2)
