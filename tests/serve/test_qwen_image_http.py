"""Qwen-Image over HTTP on the default app (``serve run serve_config.yaml``): its text encoder's hidden
states cross from the AR replica to the DiT replica as ObjectRefs (the negative prompt's too),
``/v1/images/generations`` on it, ``/v1/images/edits`` with the real ``openai`` client, and the
edit endpoint's refusals (400 naming the field)."""

import base64
import io
import json
import uuid

import pytest
from PIL import Image

pytestmark = pytest.mark.ray

ARGS = {"size": "48x32", "num_inference_steps": 2, "seed": 5}


def png_bytes(w=40, h=28) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


@pytest.fixture(scope="module")
def oai(omni_url):
    import openai

    return openai.OpenAI(base_url=omni_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_hidden_states_and_the_negatives_cross_stages_as_object_refs(client):
    req = {"prompt": f"a red fox {uuid.uuid4().hex[:8]}", "negative_prompt": "blurry", "guidance_scale": 4.0,
           "stream": True, **ARGS}
    with client.stream("POST", "/v1/pipelines/qwen-image", json=req) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert [e["stage"] for e in events if e["type"] == "stage_start"] == ["qwen-image-encoder", "qwen-image"]
    assert [(e["current"], e["total"]) for e in events if e["type"] == "progress"] == [(1, 2), (2, 2)]
    enc, dit = events[-1]["stages"]
    assert enc["output"] == "hidden_states" and enc["shape"][1] == 64 and enc["cache"] == "miss"
    # the DiT replica resolved exactly the objects the AR replica put: the ingress passed the references on
    assert dit["received_object_id"] == enc["object_id"]
    assert dit["received_negative_object_id"] == enc["negative"]["object_id"] != enc["object_id"]
    assert size_of(events[-1]["images"][0]["b64_json"]) == (48, 32)


def test_images_generations_on_qwen_image(client):
    for model in ("qwen-image", "tiny-qwen-image"):           # the pipeline, or its DiT stage's model
        r = client.post("/v1/images/generations", json={"model": model, "prompt": "a lighthouse", "n": 2, **ARGS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "qwen-image" and [size_of(d["b64_json"]) for d in body["data"]] == [(48, 32)] * 2


def test_models_list_their_modalities(oai):
    cards = {m.id: m.model_extra for m in oai.models.list().data}
    assert cards["tiny-qwen-image-edit"]["modalities"] == {"input": ["image", "text"], "output": ["image"]}
    assert cards["tiny-qwen-image"]["modalities"] == {"input": ["text"], "output": ["image"]}
    assert cards["tiny-qwen-image-encoder"]["modalities"] == {"input": ["text"], "output": ["hidden_states"]}


def test_images_edit_with_the_openai_client(oai, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(png_bytes())
    with open(src, "rb") as f:
        r = oai.images.edit(model="qwen-image-edit", image=f, prompt="make it red", size="48x32",
                            response_format="b64_json",
                            extra_body={"num_inference_steps": 2, "seed": 1, "negative_prompt": " "})
    assert len(r.data) == 1 and size_of(r.data[0].b64_json) == (48, 32)
    with open(src, "rb") as f:                                # the DiT stage's model name reaches it too
        again = oai.images.edit(model="tiny-qwen-image-edit", image=f, prompt="make it red", size="48x32",
                                extra_body={"num_inference_steps": 2, "seed": 1, "negative_prompt": " "})
    assert again.data[0].b64_json == r.data[0].b64_json      # same seed, same image


@pytest.mark.parametrize("files,data,status,param", [
    ({"image": ("a.png", png_bytes()), "mask": ("m.png", png_bytes())}, {"prompt": "x"}, 400, "mask"),
    ({"image": ("a.png", b"\x89PNG\r\n\x1a\n broken")}, {"prompt": "x"}, 400, "image"),
    ({"image": ("a.png", png_bytes())}, {"prompt": "x", "model": "tiny-pixart"}, 400, "model"),
    ({"image": ("a.png", png_bytes())}, {"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ({"image": ("a.png", png_bytes())}, {"prompt": "x", "size": "4096x4096"}, 400, "size"),
    ({}, {"prompt": "x", "model": "qwen-image-edit"}, 400, "image"),
])
def test_bad_edits_are_400s_naming_the_field(client, files, data, status, param):
    r = client.post("/v1/images/edits", files=files or None, data=data)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_an_edit_model_needs_its_image_on_generations(client):
    r = client.post("/v1/images/generations", json={"model": "qwen-image-edit", "prompt": "x", **ARGS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    assert "/v1/images/edits" in r.json()["error"]["message"]


def test_the_edit_pipeline_takes_a_data_url_and_caches_by_the_image(client):
    def data_url(color) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (40, 28), color).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    body = {"prompt": f"make it red {uuid.uuid4().hex[:8]}", "image": data_url((30, 120, 200)), **ARGS}
    first = client.post("/v1/pipelines/qwen-image-edit", json=body)
    assert first.status_code == 200, first.text
    second = client.post("/v1/pipelines/qwen-image-edit", json=body)
    other = client.post("/v1/pipelines/qwen-image-edit", json=body | {"image": data_url((31, 120, 200))})
    assert second.status_code == other.status_code == 200, second.text + other.text
    first, second, other = first.json(), second.json(), other.json()
    assert [r["stages"][1]["image_cache"] for r in (first, second, other)] == ["miss", "hit", "miss"]
    # the text encoder's output is cached by the prompt and the image's digest too
    assert [r["stages"][0]["cache"] for r in (first, second, other)] == ["miss", "hit", "miss"]
    assert second["images"] == first["images"] and other["images"] != second["images"]
    r = client.post("/v1/pipelines/qwen-image", json=body)            # takes no input image
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_the_python_handle_edits_an_image(omni_handle):
    out = omni_handle.generate_images.remote("make it red", model="qwen-image-edit", image=png_bytes(), size="48x32",
                                             num_inference_steps=2, seed=2, output_format="pil").result()
    assert out["model"] == "qwen-image-edit" and out["images"][0].size == (48, 32)
