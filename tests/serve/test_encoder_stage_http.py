"""An app whose Qwen2.5-VL stage runs its vision tower in an encoder stage of its own (``kind: encoder``,
``stages.vl.encoder``): a chat with an image through the real OpenAI client answers what the session
app's inline ``vl`` stage answers; the decoder replica ran no tower (the encoder replica did, its
embeddings reached the decoder through the object store); the encoder stage is no model of /v1/models
but /health and /info know it."""

from __future__ import annotations

import copy
import time

import httpx
import pytest

from tests.ar.test_mm_encoders import _image
from tests.serve.conftest import app_config
from tests.serve.test_media_http import _messages, _url

pytestmark = pytest.mark.ray

APP = "omni-enc"


def encoder_app_config() -> dict:
    """The session app's ``vl`` stage, its towers moved into the stage ``vl-enc``."""
    base = app_config()
    vl = copy.deepcopy(base["stages"]["vl"])
    vl["encoder"] = "vl-enc"
    enc = {"kind": "encoder", "engine": {"model": dict(vl["engine"]["model"]), "device": "cpu"},
           "deployment": {"num_replicas": 1, "max_ongoing_requests": 64, "num_cpus": 0.25}}
    return {"app": {"name": APP, "ingress": {"num_replicas": 1, "num_cpus": 0.25, "max_ongoing_requests": 256}},
            "stages": {"vl": vl, "vl-enc": enc}, "pipelines": {}}


@pytest.fixture(scope="module")
def enc_url(omni_url):
    """The app deployed beside the session app (same Serve instance, its own route prefix)."""
    from ray import serve
    from ray.serve.api import _run

    from deployments.app import build_app
    from omni_ray.cluster.admission.actor import kill_scheduler
    from omni_ray.cluster.dit_cache import kill_cache

    _run(build_app({"config": encoder_app_config()}), name=APP, route_prefix=f"/{APP}", _blocking=True)
    url = f"{omni_url}/{APP}"
    deadline = time.monotonic() + 300
    while httpx.get(url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the encoder-stage app did not become healthy"
        time.sleep(0.25)
    yield url
    serve.delete(APP)
    kill_scheduler(APP)
    kill_cache(APP)


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_image_chat_equals_the_inline_stage(enc_url, omni_url):
    msgs = _messages(_url(_image(90, 120, 21)))
    kw = dict(model="tiny-qwen2.5-vl", messages=msgs, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    split = _client(enc_url).chat.completions.create(**kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in _client(enc_url).chat.completions.create(
        **kw, stream=True) if c.choices)
    inline = _client(omni_url).chat.completions.create(**kw)           # the session app: towers inline
    assert split.choices[0].message.content == streamed == inline.choices[0].message.content
    assert split.usage == inline.usage and split.usage.prompt_tokens > 30

    info = httpx.get(enc_url + "/info", timeout=30).json()["stages"]
    assert info["vl-enc"]["kind"] == "encoder" and info["vl-enc"]["stats"]["encoded_items"] >= 1
    vl = info["vl"]["stats"]
    assert vl["media_encoded_items"] == 0 and vl["media_received_items"] >= 1


def test_encoder_stage_is_no_model_but_is_watched(enc_url):
    models = [m.id for m in _client(enc_url).models.list().data]
    assert models == ["tiny-qwen2.5-vl"]
    r = httpx.get(enc_url + "/health", timeout=30)
    assert r.status_code == 200
