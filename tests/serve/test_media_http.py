"""`serve run serve_config.yaml` answers a chat with an image (the tiny Qwen2.5-VL stage) through the
real OpenAI client, streamed and not, with the same tokens as the offline engine; /v1/models says
which modalities each model takes; bad media is a 400 naming the part, and the stage serves on."""

import base64
import io

import pytest

from omni_ray.ar import SamplingParams
from tests.ar.conftest import make_llm
from tests.ar.test_mm_encoders import _image

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def oai(omni_url):
    import openai

    return openai.OpenAI(base_url=omni_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _url(img) -> str:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


def _messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def test_models_say_their_modalities(oai):
    cards = {m.id: m.model_dump() for m in oai.models.list().data}
    assert cards["tiny-qwen2.5-vl"]["modalities"] == {"input": ["image", "text"], "output": ["text"]}
    assert cards["tiny-qwen3"]["modalities"]["input"] == ["text"]
    assert cards["tiny-pixart"]["modalities"]["output"] == ["image"]


def test_image_chat_equals_the_offline_engine(oai):
    img = _image(90, 120, 11)
    kw = dict(model="tiny-qwen2.5-vl", messages=_messages(_url(img)), max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    r = oai.chat.completions.create(**kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(**kw, stream=True)
                       if c.choices)
    offline = make_llm("tiny:qwen2.5-vl").chat(
        [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text":
                                                                         "What is in the picture?"}]}],
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert r.choices[0].message.content == streamed == offline["text"]
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 30      # image placeholders count


@pytest.mark.parametrize("url, param, words", [
    ("https://example.com/cat.png", "messages.0.content.0.image_url", "does not fetch URLs"),
    ("data:image/png;base64,iVBORw0KGgo=", "messages.0.content.0.image_url", "not a decodable image"),
    ("data:image/png;base64,%%%", "messages.0.content.0.image_url", "not valid base64"),
])
def test_bad_images_are_400s_naming_the_part(oai, url, param, words):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-qwen2.5-vl", messages=_messages(url), max_tokens=2)
    body = e.value.body if isinstance(e.value.body, dict) else {}
    err = body.get("error", body)
    assert err["param"] == param and words in err["message"]
    ok = oai.chat.completions.create(model="tiny-qwen2.5-vl", messages=_messages(_url(_image(40, 40, 1))),
                                     max_tokens=2)
    assert ok.choices[0].message.content is not None                         # the stage serves on


def test_text_model_refuses_images(oai):
    import openai

    with pytest.raises(openai.BadRequestError, match="takes text only"):
        oai.chat.completions.create(model="tiny-qwen3", messages=_messages(_url(_image(40, 40, 1))), max_tokens=2)
