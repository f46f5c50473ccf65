"""Python callers: the typed methods of the ingress handle, and a second Ray app calling this one."""

import importlib.util
import io
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.ray

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "handle_client.py"


def test_generate_text(omni_handle):
    out = omni_handle.generate_text.remote("Hello", max_tokens=5, temperature=0.0).result()
    assert out["model"] == "tiny-qwen3" and isinstance(out["text"], str)
    assert out["usage"]["completion_tokens"] == len(out["token_ids"]) <= 5


def test_generate_text_follows_a_json_schema(omni_handle):
    """response_format through the Python handle, as over HTTP: the random-weight model's output is
    valid JSON of the schema only because decoding is constrained."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    out = omni_handle.generate_text.remote(
        messages=[{"role": "user", "content": "a number"}], max_tokens=48, temperature=1.0, seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}).result()
    assert out["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["text"]), schema)


def test_stream_text(omni_handle):
    deltas = list(omni_handle.options(stream=True).stream_text.remote("Hello", max_tokens=6, temperature=0.0))
    full = omni_handle.generate_text.remote("Hello", max_tokens=6, temperature=0.0).result()
    assert "".join(deltas) == full["text"]


def test_generate_images_pil(omni_handle):
    out = omni_handle.generate_images.remote("a fox", size="64x64", num_inference_steps=2, seed=0,
                                             output_format="pil").result()
    assert isinstance(out["images"][0], Image.Image) and out["images"][0].size == (64, 64)


def test_handle_errors_are_typed(omni_handle):
    from omni_ray.errors import InvalidRequestError, ModelNotFoundError

    with pytest.raises(InvalidRequestError):
        omni_handle.generate_text.remote("Hello", max_tokens=-1).result()
    with pytest.raises(ModelNotFoundError):
        omni_handle.run_pipeline.remote("no-such-pipeline", "x").result()


@pytest.mark.parametrize("temperature", [2.5, float("nan")])
def test_one_rule_one_message_offline_by_handle_and_over_http(omni_handle, client, temperature):
    """A temperature out of range (or NaN) is refused with the same message and field whether the
    engine's params, the Python handle or the HTTP API gets it."""
    from omni_ray.ar.sampling_params import SamplingParams
    from omni_ray.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as offline:
        SamplingParams(temperature=temperature)
    with pytest.raises(InvalidRequestError) as by_handle:
        omni_handle.generate_text.remote("Hello", max_tokens=2, temperature=temperature).result()
    body = b'{"prompt": "Hello", "max_tokens": 2, "temperature": %s}' % str(temperature).replace("nan", "NaN").encode()
    for path in ("/v1/completions", "/v1/pipelines/chat"):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["message"], err["param"], err["type"]) == (offline.value.message, "temperature",
                                                               "invalid_request_error")
    assert (by_handle.value.message, by_handle.value.param) == (offline.value.message, "temperature")


def test_second_app_calls_omni_through_get_app_handle(omni_url):
    import ray.cloudpickle
    from ray import serve

    spec = importlib.util.spec_from_file_location("omni_handle_client_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    ray.cloudpickle.register_pickle_by_value(example)   # the example is a file, not an installed module
    try:
        caller = serve.run(example.app, name="omni-client", route_prefix=None)
        out = caller.remote("a lighthouse").result(timeout_s=300)
    finally:
        serve.delete("omni-client")
    assert Image.open(io.BytesIO(out["image_png"])).size == (64, 64)
    assert Image.open(io.BytesIO(out["pipeline_png"])).size == (64, 64)
    assert [s for s, _ in out["pipeline_stages"]] == ["llm", "image"]
    assert 0 < out["caption_tokens"] <= 16 and isinstance(out["streamed"], list)
