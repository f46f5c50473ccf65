"""The audio routes (deployments/ingress/speech.py) on the real runner and stage engines, in this process
without Ray: the tiny Qwen2.5-Omni thinker -> talker -> token2wav as OmniLLM runs them, behind the same
SpeechRoutes the ingress uses. A chat reply's audio decodes, streamed pcm16 chunks make the whole reply,
/v1/audio/speech bytes and SSE decode to the same audio, a client that leaves stops every stage."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from deployments.ingress.admission import Ticket
from deployments.ingress.catalog import Catalog
from deployments.ingress.lifecycle import Lifecycle
from deployments.ingress.request_ids import RequestIds
from deployments.ingress.speech import SpeechRoutes
from deployments.openai.audio import SpeechRequest
from deployments.openai.protocol import ChatCompletionRequest
from deployments.streams import OpenStreams
from omni_ray.errors import InvalidRequestError

LSB = 1 / 32768
MSG = [{"role": "user", "content": "Say hello."}]
FAST = {"talker": {"max_tokens": 12}, "t2w": {"num_inference_steps": 2}}     # a short utterance, 2 ODE steps
CHAT = dict(messages=MSG, max_tokens=4, temperature=0.0, seed=0, ignore_eos=True, stage_args=FAST)
AR = {"device": "cpu", "enforce_eager": True}


def config() -> dict:
    stages = {"thinker": {"kind": "ar", "engine": {"model": {"path": "tiny:qwen2.5-omni", "name": "omni"}} | AR},
              "talker": {"kind": "ar", "engine": {"model": {"path": "tiny:qwen2.5-omni", "submodel": "talker"}} | AR},
              "t2w": {"kind": "dit", "engine": {"model": {"path": "tiny:qwen2.5-omni"}, "device": "cpu"}},
              "text": {"kind": "ar", "engine": {"model": {"path": "tiny:qwen3", "name": "tiny-qwen3"}} | AR}}
    graph = {"model": "thinker", "stages": {"talker": "talker", "token2wav": "t2w"}}
    return {"stages": stages, "pipelines": {"omni-speech": {"graph": graph}},
            "scheduler": {"enabled": False}}


class _Admission:
    enabled = False

    async def admit(self, rid, pipeline, stages, priority="normal"):
        return Ticket(rid)


@pytest.fixture(scope="module")
def omni():
    from omni_ray import OmniLLM

    with OmniLLM(config()) as o:
        yield o


@pytest.fixture(scope="module")
def routes(omni):
    cfg = omni.config
    catalog = Catalog(cfg)
    ingress = SimpleNamespace(config=cfg, catalog=catalog, kinds=omni._kinds(), names=catalog.names,
                              backends={k: omni._backend(k) for k in ("thinker", "talker", "t2w")},
                              requests=Lifecycle(cfg.app, _Admission(), OpenStreams(cfg.app.streaming)),
                              ids=RequestIds())
    return SpeechRoutes(ingress)


def drain(omni, response, first: int | None = None) -> list:
    """The body of a StreamingResponse (its first ``first`` parts, then closed: a client that leaves)."""
    async def run():
        out, it = [], response.body_iterator
        try:
            async for part in it:
                out.append(part)
                if first is not None and len(out) >= first:
                    break
        finally:
            await it.aclose()
        return out
    return omni._run(run())


def sse_json(parts: list[str]) -> list:
    text = "".join(parts)
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768


def audio_body(fmt: str, **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(**(CHAT | kw), modalities=["text", "audio"], audio={"voice": "Chelsie", "format": fmt})


def test_a_chat_reply_speaks(omni, routes):
    out = omni._run(routes.chat(audio_body("wav")))
    r = ChatCompletion.model_validate(out)
    msg = r.choices[0].message
    assert msg.content is None and msg.audio.transcript and r.usage.completion_tokens == 4
    y, rate = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)), dtype="float32")
    assert rate == 24000 and y.size > 0 and np.isfinite(y).all()


def test_streamed_pcm16_makes_the_whole_reply(omni, routes):
    whole = ChatCompletion.model_validate(omni._run(routes.chat(audio_body("pcm16")))).choices[0].message.audio
    resp = omni._run(routes.chat(audio_body("pcm16", stream=True)))
    assert resp.media_type == "text/event-stream"
    chunks = [ChatCompletionChunk.model_validate(c) for c in sse_json(drain(omni, resp))]
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    data = b"".join(base64.b64decode(a.data) for a in audio if a.data)
    assert "".join(a.transcript or "" for a in audio) == whole.transcript
    assert sum(1 for a in audio if a.data) >= 1
    np.testing.assert_allclose(pcm(data), pcm(base64.b64decode(whole.data)), atol=2 * LSB, rtol=0)


def test_speech_bytes_and_sse_are_the_same_audio(omni, routes):
    kw = dict(input="Hello there.", voice="ethan", seed=0, max_tokens=4, stage_args=FAST)
    wav = b"".join(drain(omni, omni._run(routes.speech(SpeechRequest(**kw, response_format="wav")))))
    y, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == 24000 and y.size > 0
    resp = omni._run(routes.speech(SpeechRequest(**kw, response_format="pcm", stream_format="sse")))
    events = sse_json(drain(omni, resp))
    assert [e["type"] for e in events][-1] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == 4
    data = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    np.testing.assert_allclose(pcm(data), y, atol=2 * LSB, rtol=0)


@pytest.mark.parametrize("kw,param", [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio.voice"),
    ({"model": "tiny-qwen3"}, "modalities"),
])
def test_chat_400s_before_any_stage_runs(omni, routes, kw, param):
    body = ChatCompletionRequest(**(CHAT | {"modalities": ["text", "audio"],
                                            "audio": {"voice": "Chelsie", "format": "wav"}} | kw))
    with pytest.raises(InvalidRequestError) as e:
        omni._run(routes.chat(body))
    assert e.value.param == param


def test_speech_of_a_model_that_does_not_speak_is_400(omni, routes):
    with pytest.raises(InvalidRequestError) as e:
        omni._run(routes.speech(SpeechRequest(model="tiny-qwen3", input="Hi.", voice="Chelsie")))
    assert e.value.param == "model"


BUSY = ("num_running", "num_waiting", "num_streams", "active_requests", "waiting_requests")


def busy(omni) -> dict:
    return {k: sum(v for f, v in s.items() if f in BUSY) for k, s in omni.stats().items()
            if k in ("thinker", "talker", "t2w")}


def test_a_client_that_leaves_stops_every_stage(omni, routes):
    import time

    before = omni.stats()["thinker"]["decode_tokens"]
    body = audio_body("pcm16", stream=True, max_tokens=300, stage_args={"talker": {"max_tokens": 600},
                                                                         "t2w": {"num_inference_steps": 2}})
    resp = omni._run(routes.chat(body))

    async def leave_after_the_first_words():
        it = resp.body_iterator
        async for part in it:
            if '"transcript"' in part:
                break
        live = busy(omni)
        await it.aclose()                            # the client is gone
        return live

    live = omni._run(leave_after_the_first_words())
    assert live["thinker"], live
    deadline = time.monotonic() + 30
    while any((b := busy(omni)).values()):
        assert time.monotonic() < deadline, b
        time.sleep(0.1)
    assert omni.stats()["thinker"]["decode_tokens"] - before < 300          # stopped long before its end


def test_the_catalog_finds_a_models_speech_pipeline():
    from omni_ray.config import OmniConfig, validate
    from omni_ray.graphs import expand_pipelines

    cat = Catalog(expand_pipelines(validate(OmniConfig, config())))
    assert cat.speech_pipeline(None)[0] == cat.speech_pipeline("omni")[0] == "omni-speech"       # served name
    assert cat.speech_pipeline("thinker")[0] == cat.speech_pipeline("omni-speech")[0] == "omni-speech"
    with pytest.raises(InvalidRequestError) as e:
        cat.speech_pipeline("tiny-qwen3", param="modalities")
    assert e.value.param == "modalities" and "['omni']" in e.value.message
    assert cat.voices(cat.speech_pipeline(None)[1]) == ["Chelsie", "Ethan"]
    assert cat.modalities("thinker")["output"] == ["audio", "text"]           # /v1/models: it speaks
    assert cat.modalities("text")["output"] == ["text"]
    no_speech = Catalog(expand_pipelines(validate(OmniConfig, config() | {"pipelines": {}})))
    assert no_speech.modalities("thinker")["output"] == ["text"]
