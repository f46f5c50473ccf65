"""Every shipped pipeline end to end over HTTP, streamed and not; the hidden-state handoff."""

import base64
import io
import json
import uuid

import pytest
from PIL import Image

pytestmark = pytest.mark.ray

IMAGE_ARGS = {"size": "64x64", "num_inference_steps": 2, "seed": 5}


def sse_events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_pipeline_list(client):
    names = {p["id"] for p in client.get("/v1/pipelines").json()["data"]}
    assert names == {"chat", "image", "text2image", "text2image-llm-encoder", "qwen-image", "qwen-image-edit",
                     "video", "omni"}


def test_chat_pipeline(client):
    r = client.post("/v1/pipelines/chat", json={"prompt": "hello", "max_tokens": 5, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pipeline"] == "chat" and isinstance(body["text"], str) and body["images"] is None
    assert [s["stage"] for s in body["stages"]] == ["llm"]
    assert body["usage"]["completion_tokens"] == body["stages"][0]["num_output_tokens"] <= 5


def test_image_pipeline(client):
    r = client.post("/v1/pipelines/image", json={"prompt": "a boat", "n": 2, **IMAGE_ARGS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [png_size(i["b64_json"]) for i in body["images"]] == [(64, 64), (64, 64)]
    assert body["stages"][0]["stage"] == "image"


def test_text2image_streams_stages_and_steps(client):
    req = {"prompt": f"a castle {uuid.uuid4().hex}", "max_tokens": 6, "stream": True, **IMAGE_ARGS}  # no cache hit
    with client.stream("POST", "/v1/pipelines/text2image", json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    kinds = [e["type"] for e in events[:-1]]
    assert kinds[0] == "start" and kinds[-1] == "result"
    starts = [e["stage"] for e in events[:-1] if e["type"] == "stage_start"]
    ends = [e["stage"] for e in events[:-1] if e["type"] == "stage_end"]
    assert starts == ends == ["llm", "image"]
    progress = [(e["current"], e["total"]) for e in events[:-1] if e["type"] == "progress"]
    assert progress == [(1, 2), (2, 2)]
    text = "".join(e["delta"] for e in events[:-1] if e["type"] == "text")
    result = events[-2]
    assert result["text"] == text                       # the rewrite, as streamed, is what the DiT drew
    assert png_size(result["images"][0]["b64_json"]) == (64, 64)
    # stage order in the stream: all llm text comes before the image stage starts
    assert kinds.index("progress") > max([i for i, k in enumerate(kinds) if k == "text"], default=0)


def test_text2image_non_streamed_via_run(client):
    r = client.post("/v1/pipelines/run", json={"pipeline": "text2image", "prompt": "a castle", "max_tokens": 6,
                                               **IMAGE_ARGS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["stage"] for s in body["stages"]] == ["llm", "image"]
    assert all(s["elapsed_s"] > 0 for s in body["stages"])
    assert len(body["images"]) == 1


def test_llm_encoder_pipeline_passes_an_object_ref(client):
    r = client.post("/v1/pipelines/text2image-llm-encoder", json={"prompt": "a red fox", **IMAGE_ARGS})
    assert r.status_code == 200, r.text
    body = r.json()
    enc, dit = body["stages"]
    assert enc["stage"] == "llm" and enc["output"] == "hidden_states" and enc["shape"][1] == 64
    # the DiT replica resolved exactly the object the AR replica put: the ingress passed the reference on
    assert dit["stage"] == "image-llm" and dit["received_object_id"] == enc["object_id"]
    assert png_size(body["images"][0]["b64_json"]) == (64, 64)


def test_ar_encode_returns_an_unresolved_ref(omni_url):
    import ray
    from ray import serve

    from omni_ray.stages import ARRequest, Handoff

    llm = serve.get_deployment_handle("llm", app_name="omni")
    out = llm.encode.remote(ARRequest("test-encode-1", prompt="a red fox")).result()
    assert isinstance(out, Handoff) and out.tensor is None
    assert isinstance(out.ref, ray.ObjectRef)           # a reference, not the tensor
    arr = ray.get(out.ref)
    assert list(arr.shape) == out.shape and arr.shape[1] == 64


def test_ar_generate_hands_hidden_states_as_unresolved_refs(omni_url):
    """``return_hidden_states`` through the AR replica: each streamed delta's rows are a Handoff of an
    ObjectRef (never the tensor), ``complete`` one Handoff joining them; resolved and concatenated they
    equal the replica's encode of the prompt and the fed reply."""
    import numpy as np
    import ray
    from ray import serve

    from omni_ray.ar import SamplingParams
    from omni_ray.ar.models.checkpoint import checkpoint_layout
    from omni_ray.stages import ARRequest, Handoff

    llm = serve.get_deployment_handle("llm", app_name="omni")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, return_hidden_states=True)
    deltas = list(llm.options(stream=True).generate.remote(ARRequest("test-rows-1", prompt="a red fox",
                                                                     params=params)))
    parts = [d["hidden_states"] for d in deltas if "hidden_states" in d]
    assert parts and all(isinstance(h, Handoff) and h.tensor is None and isinstance(h.ref, ray.ObjectRef)
                         for h in parts)
    rows = np.concatenate([ray.get(h.ref) for h in parts])
    whole = llm.complete.remote(ARRequest("test-rows-2", prompt="a red fox", params=params)).result()
    joined = whole["hidden_states"]
    assert isinstance(joined, Handoff) and joined.tensor is None and joined.shape == list(rows.shape)
    np.testing.assert_allclose(np.concatenate(ray.get(joined.refs)), rows, atol=1e-5)
    tokenizer = checkpoint_layout(llm.info.remote().result()["path"]).load_tokenizer()
    fed = tokenizer.encode("a red fox", add_special_tokens=True) + [t for d in deltas for t in d["token_ids"]][:-1]
    enc = llm.encode.remote(ARRequest("test-rows-3", prompt=fed)).result()
    np.testing.assert_allclose(ray.get(enc.ref), rows, atol=1e-5)


def test_image_model_reaches_llm_conditioned_dit_through_its_pipeline(client):
    r = client.post("/v1/images/generations", json={"model": "tiny-pixart-llm", "prompt": "a fox", **IMAGE_ARGS})
    assert r.status_code == 200, r.text
    assert png_size(r.json()["data"][0]["b64_json"]) == (64, 64)


def test_deterministic_images_come_from_the_dit_cache(client):
    req = {"prompt": f"a cached lighthouse {uuid.uuid4().hex}", **IMAGE_ARGS}
    first = client.post("/v1/pipelines/image", json=req).json()
    second = client.post("/v1/pipelines/image", json=req).json()
    assert first["stages"][0]["image_cache"] == "miss" and second["stages"][0]["image_cache"] == "hit"
    assert second["images"] == first["images"]
    other = client.post("/v1/pipelines/image", json=req | {"seed": 6}).json()
    assert other["stages"][0]["image_cache"] == "miss"       # another seed is another image


def test_scheduler_tracks_requests(client):
    status = client.get("/info").json()["scheduler"]
    assert status["enabled"] is True and "error" not in status, status
    assert status["processed"]["completed"] > 0
    llm = status["stages"]["llm"]
    assert len(llm["replicas"]) == 1 and llm["capacity"] == 64       # reported by the llm replica: max_num_seqs
    assert status["stages"]["image"]["capacity"] == 8                  # the DiT replica: max_batch_size


def test_generate_route_of_the_vllm_omni_api_server(client):
    """POST /generate runs the same runner as /v1/pipelines/{name}; GET /health and /info answer."""
    r = client.post("/generate", json={"prompt": "a castle", "pipeline": "text2image",
                                       "stage_args": [{"max_tokens": 4, "temperature": 0},
                                                      {"size": "64x64", "num_inference_steps": 2, "seed": 5}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pipeline"] == "text2image" and [s["stage"] for s in body["stages"]] == ["llm", "image"]
    assert body["usage"]["completion_tokens"] <= 4 and png_size(body["images"][0]["b64_json"]) == (64, 64)
    same = client.post("/v1/pipelines/text2image", json={"prompt": "a castle", "stage_args": {
        "llm": {"max_tokens": 4, "temperature": 0}, "image": {"size": "64x64", "num_inference_steps": 2, "seed": 5}}})
    assert same.json()["text"] == body["text"] and same.json()["images"] == body["images"]
    bad = client.post("/generate", json={"prompt": "x"})                     # several pipelines, none named
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "pipeline"
    bad = client.post("/generate", json={"prompt": "x", "pipeline": "chat", "stage_args": [{}, {}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stage_args"
    events = []
    with client.stream("POST", "/generate", json={"prompt": "hi", "pipeline": "chat", "stream": True,
                                                  "max_tokens": 3}) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert events[-1] == "[DONE]" and any(isinstance(e, dict) for e in events)
    assert client.get("/health").json() == {"status": "ok"} and client.get("/info").status_code == 200
