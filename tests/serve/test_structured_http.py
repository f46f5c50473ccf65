"""Structured outputs over HTTP with the real ``openai`` client against ``serve run serve_config.yaml``
(the tiny random-weight Qwen3: only the constraint makes its output valid)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.ray

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[a-z]{1,10}$"},
        "weather": {"enum": ["sun", "rain", "snow"]},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 31}, "maxItems": 4},
        "wind": {"type": "object", "properties": {"kmh": {"type": "integer", "minimum": 0, "maximum": 200},
                                                  "dir": {"enum": ["n", "e", "s", "w"]}},
                 "required": ["kmh", "dir"], "additionalProperties": False},
    },
    "required": ["city", "weather", "days", "wind"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}
MSG = [{"role": "user", "content": "The weather in Paris, as JSON"}]


@pytest.fixture(scope="module")
def oai(omni_url):
    import openai

    return openai.OpenAI(base_url=omni_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chat_json_schema_validates(oai, seed):
    r = oai.chat.completions.create(model="tiny-qwen3", messages=MSG, response_format=FORMAT, max_tokens=150,
                                    temperature=1.0, seed=seed)
    c = r.choices[0]
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_chat_json_schema_streamed_validates(oai):
    for seed in (3, 4):
        chunks = list(oai.chat.completions.create(model="tiny-qwen3", messages=MSG, response_format=FORMAT,
                                                  max_tokens=150, temperature=1.0, seed=seed, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
        jsonschema.validate(json.loads(text), SCHEMA)


class Wind(BaseModel):
    kmh: int = Field(ge=0, le=99)
    dir: Literal["n", "e", "s", "w"]


class Forecast(BaseModel):
    weather: Literal["sun", "rain", "snow"]
    wind: Wind
    days: list[Literal["mon", "tue", "wed"]] = Field(max_length=3)
    windy: bool


def test_openai_parse_with_a_pydantic_model(oai):
    """The client's own structured-output helper: a strict json_schema built from a pydantic model
    (nested model under $defs, enums, arrays), its reply parsed back into the model."""
    r = oai.chat.completions.parse(model="tiny-qwen3", messages=MSG, response_format=Forecast, max_tokens=150,
                                   temperature=1.0, seed=5)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Forecast) and isinstance(parsed.wind, Wind)


def test_completions_json_object_regex_and_choice(oai):
    r = oai.completions.create(model="tiny-qwen3", prompt="Give a date:", max_tokens=30, temperature=1.0, seed=1,
                               extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20\d{2}-[01]\d-[0-3]\d", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = oai.chat.completions.create(model="tiny-qwen3", messages=MSG, max_tokens=10, temperature=1.0, seed=2,
                                    extra_body={"guided_choice": ["sunny", "rainy"]})
    assert r.choices[0].message.content in ("sunny", "rainy")
    r = oai.completions.create(model="tiny-qwen3", prompt="JSON:", max_tokens=200, temperature=0.0,
                               extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":                       # any object: it may not close in time
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:
        assert r.choices[0].text.startswith("{")


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(oai):
    free = dict(model="tiny-qwen3", prompt="The lighthouse", max_tokens=24, temperature=1.0, seed=9,
                extra_body={"ignore_eos": True})
    alone = oai.completions.create(**free).choices[0].text

    def constrained(seed):
        return oai.chat.completions.create(model="tiny-qwen3", messages=MSG, response_format=FORMAT, max_tokens=150,
                                           temperature=1.0, seed=seed).choices[0].message.content

    with ThreadPoolExecutor(5) as pool:
        outs = [pool.submit(constrained, s) for s in range(10, 14)]
        mixed = pool.submit(lambda: oai.completions.create(**free).choices[0].text)
        assert mixed.result() == alone
        for f in outs:
            jsonschema.validate(json.loads(f.result()), SCHEMA)


def test_a_bad_schema_is_a_400_and_the_server_serves_on(oai):
    import openai

    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                         "properties": {"a": {"type": "nope"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-qwen3", messages=MSG, response_format=bad, max_tokens=8)
    assert e.value.body["param"] == "response_format" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-qwen3", messages=MSG, response_format={"type": "yaml"}, max_tokens=8)
    assert e.value.body["param"] == "response_format.type"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny-qwen3", prompt="x", max_tokens=8, extra_body={"guided_regex": "(["})
    assert e.value.body["param"] == "guided_regex"
    r = oai.chat.completions.create(model="tiny-qwen3", messages=MSG, response_format=FORMAT, max_tokens=150, seed=0)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_too_few_tokens_end_by_length(oai):
    r = oai.chat.completions.create(model="tiny-qwen3", messages=MSG, response_format=FORMAT, max_tokens=4, seed=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
