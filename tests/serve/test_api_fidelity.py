"""OpenAI API fidelity over HTTP on `serve run serve_config.yaml`, with the real `openai` client:
models.retrieve, X-Request-Id equal to the response's id, fields the server does not honour
refused with a 400 naming them, messages that name the actual limit, usage of the LLM encoder."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.ray

MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def oai(omni_url):
    import openai

    return openai.OpenAI(base_url=omni_url + "/v1", api_key="unused", max_retries=0, timeout=120)


# ----------------------------------------------------------------------------- GET /v1/models/{id}
def test_models_retrieve(oai):
    listed = {m.id: m for m in oai.models.list().data}
    for model_id in ("tiny-qwen3", "tiny-pixart"):
        m = oai.models.retrieve(model_id)
        assert (m.id, m.object, m.owned_by) == (model_id, "model", "omni-ray")
        assert m.created == listed[model_id].created > 0


@pytest.mark.parametrize("model_id", ["no-such-model", "org/no-such-model", "llm"])
def test_models_retrieve_unknown_is_404_with_an_openai_body(oai, client, model_id):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve(model_id)
    err = e.value.body
    assert err["type"] == "not_found_error" and err["code"] == "model_not_found" and model_id in err["message"]
    assert client.get(f"/v1/models/{model_id}").status_code == 404


# ----------------------------------------------------------------------------- X-Request-Id
def one_header(headers) -> str:
    values = headers.get_list("x-request-id")
    assert len(values) == 1, values                   # one value, never "a, b"
    return values[0]


def test_the_responses_id_is_its_x_request_id(oai):
    raw = oai.chat.completions.with_raw_response.create(model="tiny-qwen3", messages=MSG, max_tokens=2)
    assert raw.parse().id == "chatcmpl-" + one_header(raw.headers)
    raw = oai.completions.with_raw_response.create(model="tiny-qwen3", prompt="Hi", max_tokens=2)
    assert raw.parse().id == "cmpl-" + one_header(raw.headers)


@pytest.mark.parametrize("path,body,prefix", [
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 3, "stream": True}, "chatcmpl-"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "stream": True}, "cmpl-"),
    ("/v1/pipelines/chat", {"prompt": "Hi", "max_tokens": 3, "stream": True}, "pipe-"),
])
def test_streams_ids_are_their_x_request_id(client, path, body, prefix):
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        header = one_header(r.headers)
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert {e["id"] for e in events if "id" in e} == {prefix + header}


def test_pipelines_and_images(client):
    r = client.post("/v1/pipelines/chat", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["id"] == "pipe-" + one_header(r.headers)
    r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "num_inference_steps": 1})
    assert r.status_code == 200 and one_header(r.headers)


def test_a_clients_x_request_id_names_its_request(oai, client):
    raw = oai.chat.completions.with_raw_response.create(model="tiny-qwen3", messages=MSG, max_tokens=2,
                                                        extra_headers={"X-Request-Id": "trace-42.a:b"})
    assert one_header(raw.headers) == "trace-42.a:b"
    assert raw.parse().id == "chatcmpl-trace-42.a:b"
    again = oai.chat.completions.create(model="tiny-qwen3", messages=MSG, max_tokens=2,
                                        extra_headers={"X-Request-Id": "trace-42.a:b"})
    assert again.id.startswith("chatcmpl-trace-42.a:b-")              # sent twice: still unique
    r = client.post("/v1/requests/chatcmpl-trace-42.a:b/cancel")      # the id works where ids go
    assert r.status_code == 200 and r.json() == {"id": "chatcmpl-trace-42.a:b", "cancelled": False}
    bad = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2},
                      headers={"X-Request-Id": "not valid"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"


# ----------------------------------------------------------------------------- nothing silently ignored
@pytest.mark.parametrize("kw,param", [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"logit_bias": {"15": 50}}, "logit_bias"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),   # no talker
    ({"reasoning_effort": "low"}, "reasoning_effort"),
])
def test_chat_fields_not_honoured_are_400(oai, kw, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-qwen3", messages=MSG, max_tokens=2, **kw)
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("kw,param", [({"suffix": "!"}, "suffix"), ({"best_of": 3}, "best_of"),
                                      ({"logit_bias": {"15": -100}}, "logit_bias")])
def test_completion_fields_not_honoured_are_400(oai, kw, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny-qwen3", prompt="Hi", max_tokens=2, **kw)
    assert e.value.body["param"] == param


def test_image_fields_not_honoured_are_400(oai):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(model="tiny-pixart", prompt="a fox", size="64x64", quality="hd")
    assert e.value.body["param"] == "quality"


def test_harmless_fields_are_accepted(oai):
    kw = dict(model="tiny-qwen3", messages=MSG, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = oai.chat.completions.create(**kw)
    extra = oai.chat.completions.create(store=False, metadata={"k": "v"}, user="u", service_tier="auto",
                                        modalities=["text"], **kw)
    assert extra.choices[0].message.content == plain.choices[0].message.content


# ----------------------------------------------------------------------------- messages name the limit
def test_too_many_stop_strings_names_this_servers_limit(oai):
    import openai

    for n in (5, 20):
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model="tiny-qwen3", prompt="Hi", max_tokens=2, stop=[f"s{i}" for i in range(n)])
        assert e.value.body["param"] == "stop"
        assert e.value.body["message"] == (f"stop has {n} strings; this server allows at most 4 "
                                           "(app.limits.max_stop_sequences)")


# ----------------------------------------------------------------------------- usage
def test_llm_encoder_pipeline_reports_the_prompt_tokens_it_encoded(client):
    r = client.post("/v1/pipelines/text2image-llm-encoder",
                    json={"prompt": "a red fox in the snow", "size": "64x64", "num_inference_steps": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    (enc,) = [s for s in out["stages"] if s["output"] == "hidden_states"]
    assert out["usage"]["prompt_tokens"] == enc["shape"][0] > 0
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"]
