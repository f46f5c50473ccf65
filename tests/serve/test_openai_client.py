"""`serve run serve_config.yaml` answers the real OpenAI Python client."""

import base64
import io

import pytest
from PIL import Image

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def oai(omni_url):
    import openai

    return openai.OpenAI(base_url=omni_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(oai):
    ids = {m.id for m in oai.models.list().data}
    assert {"tiny-qwen3", "tiny-pixart", "tiny-pixart-llm"} <= ids


def test_completion(oai):
    r = oai.completions.create(model="tiny-qwen3", prompt="The sky is", max_tokens=8, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    again = oai.completions.create(model="tiny-qwen3", prompt="The sky is", max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text          # greedy is deterministic


def test_completion_n_and_list_prompt(oai):
    r = oai.completions.create(model="tiny-qwen3", prompt=["a", "b"], n=2, max_tokens=3, seed=3,
                               extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12


def test_chat(oai):
    r = oai.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=6, seed=7, logprobs=True)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert r.usage.completion_tokens == len(c.logprobs.content) <= 6
    assert all(t.logprob <= 0.0 for t in c.logprobs.content)


def test_chat_stream(oai):
    kw = dict(model="tiny-qwen3", messages=[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Tell me a story"}],
              max_tokens=12, seed=11, extra_body={"ignore_eos": True})
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    full = oai.chat.completions.create(**kw)                   # same seed: same text, streamed or not
    assert full.choices[0].message.content == text


def test_images(oai):
    r = oai.images.generate(model="tiny-pixart", prompt="a red fox", n=2, size="64x64",
                            response_format="b64_json", extra_body={"num_inference_steps": 2, "seed": 1})
    assert len(r.data) == 2
    for d in r.data:
        img = Image.open(io.BytesIO(base64.b64decode(d.b64_json)))
        assert img.size == (64, 64)


def test_openai_errors(oai):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny-qwen3", prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])


def test_server_timing_splits_a_request(client):
    """Every response says where its time went (Server-Timing): admission, the stage calls, the
    AR replica's own share, the total; the parts nest inside each other."""
    from deployments.ingress.timing import parse

    r = client.post("/v1/completions", json={"model": "tiny-qwen3", "prompt": "hello", "max_tokens": 4, "n": 2})
    assert r.status_code == 200, r.text
    t = parse(r.headers["server-timing"])
    assert set(t) == {"admit", "work", "engine", "total"}, t
    assert 0 < t["engine"] <= t["work"] and t["admit"] + t["work"] <= t["total"]
    with client.stream("POST", "/v1/completions", json={"model": "tiny-qwen3", "prompt": "hi", "max_tokens": 4,
                                                        "stream": True}) as s:
        t = parse(s.headers["server-timing"])
        s.read()
    assert set(t) == {"admit", "first_event", "total"} and t["admit"] + t["first_event"] <= t["total"]
    assert set(parse(client.get("/v1/models").headers["server-timing"])) == {"total"}
