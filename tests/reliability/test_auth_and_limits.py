"""API keys on every endpoint but /health, and every request limit answered with a 400 before any
engine work, on the guarded app (tests/reliability/conftest.py: one key, tight limits)."""

from __future__ import annotations

import httpx
import pytest

from tests.reliability.conftest import API_KEY, GUARD_LIMITS

pytestmark = pytest.mark.ray

def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


# the edit form, sent as multipart (``send``): this app serves no edit model, so with the key it is a 400
# that names the model, past the key check
EDIT_FORM = {"files": {"image": ("in.png", _png(), "image/png")},
             "data": {"prompt": "make it blue", "model": "tiny-pixart", "size": "32x32"}}

# a request for every route of the app (path template -> (method, concrete path, body[, status with the
# right key: 200 unless the guarded app cannot serve it, e.g. no edit or video model]))
VALID = {
    "/v1/models": ("GET", "/v1/models", None),
    "/v1/models/{model_id}": ("GET", "/v1/models/tiny-qwen3", None),
    "/v1/pipelines": ("GET", "/v1/pipelines", None),
    "/info": ("GET", "/info", None),
    "/v1/completions": ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    "/v1/chat/completions": ("POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    "/v1/images/generations": ("POST", "/v1/images/generations",
                               {"prompt": "a fox", "size": "32x32", "num_inference_steps": 1}),
    "/v1/pipelines/{name}": ("POST", "/v1/pipelines/chat", {"prompt": "hi", "max_tokens": 2}),
    "/generate": ("POST", "/generate", {"prompt": "hi", "pipeline": "chat", "max_tokens": 2}),
    "/v1/requests/{request_id}/cancel": ("POST", "/v1/requests/nope-123/cancel", None),
    "/health": ("GET", "/health", None),
    "/v1/images/edits": ("POST", "/v1/images/edits", EDIT_FORM, 400),
    "/v1/videos": ("GET", "/v1/videos", None),
    "/v1/videos/{video_id}": ("GET", "/v1/videos/video-nope", None, 404),
    "/v1/videos/{video_id}/content": ("GET", "/v1/videos/video-nope/content", None, 404),
    "/v1/audio/speech": ("POST", "/v1/audio/speech", {"input": "hi", "voice": "Chelsie"}, 400),   # no talker here
}


def send(route: str, url: str, headers: dict, timeout: float) -> httpx.Response:
    method, path, body, *_ = VALID[route]
    if body is EDIT_FORM:
        return httpx.request(method, url + path, files=body["files"], data=body["data"], headers=headers,
                             timeout=timeout)
    return httpx.request(method, url + path, json=body, headers=headers, timeout=timeout)
KEYED = {"authorization": f"Bearer {API_KEY}"}


def openapi_routes(guard) -> set[str]:
    doc = httpx.get(guard.url + "/openapi.json", headers=KEYED, timeout=30).json()
    return set(doc["paths"])


def test_every_documented_route_is_covered(guard):
    assert openapi_routes(guard) == set(VALID), "a new route needs an entry in VALID (and a key check)"


@pytest.mark.parametrize("route", sorted(set(VALID) - {"/health"}))
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-0123456789", f"Basic {API_KEY}", "Bearer",
                                  f"Bearer {API_KEY}x", API_KEY])
def test_without_the_right_key_401(guard, route, auth):
    headers = {"authorization": auth} if auth is not None else {}
    r = send(route, guard.url, headers, 60)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("route", sorted(VALID))
def test_with_the_right_key_200(guard, route):
    r = send(route, guard.url, KEYED, 120)
    want = VALID[route][3] if len(VALID[route]) > 3 else 200
    assert r.status_code == want, r.text


def test_health_is_open_and_docs_are_not(guard):
    assert httpx.get(guard.url + "/health", timeout=30).json() == {"status": "ok"}
    for path in ("/openapi.json", "/docs", "/v1/nothing-here"):
        assert httpx.get(guard.url + path, timeout=30).status_code == 401, path


def test_auth_comes_before_body_parsing(guard):
    """An unauthenticated client learns nothing about the body schema: 401, not 400."""
    r = httpx.post(guard.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 401


# ----------------------------------------------------------------------------- limits
def engine_work(guard) -> dict:
    s = guard.stats(KEYED)
    return {"llm": (s["llm"]["steps"], s["llm"]["prefill_tokens"]),
            "image": s["image"]["requests_added"], "image-llm": s["image-llm"]["requests_added"]}


L = GUARD_LIMITS
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
OVER = [
    ("/v1/completions", {"prompt": "x", "max_tokens": L["max_tokens"] + 1}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": L["max_tokens"] + 1}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2, "n": L["max_n"] + 1}, "n"),
    ("/v1/completions", {"prompt": ["a"] * (L["max_prompts"] + 1), "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [5] * (L["max_prompt_tokens"] + 1), "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stop": ["a", "b", "c"]}, "stop"),
    ("/v1/images/generations", {"prompt": "x", "size": "72x64"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "32x32", "num_inference_steps": L["max_steps"] + 1},
     "num_inference_steps"),
    ("/v1/images/generations", {"prompt": "x", "size": "32x32", "n": L["max_images"] + 1}, "n"),
    ("/v1/pipelines/image", {"prompt": "x", "stage_args": {"image": {"num_inference_steps": 50}}},
     "stage_args.image.num_inference_steps"),
    ("/v1/pipelines/image", {"prompt": "x", "stage_args": {"image": {"size": "512x512"}}}, "stage_args.image.size"),
    ("/v1/pipelines/chat", {"prompt": "x", "stage_args": {"llm": {"max_tokens": 10000}}},
     "stage_args.llm.max_tokens"),
    ("/v1/pipelines/chat", {"prompt": "x", "stage_args": {"llm": {"temperature": "hot"}}},
     "stage_args.llm.temperature"),
    ("/v1/pipelines/chat", {"prompt": "x", "stage_args": {"llm": {"frobnicate": 1}}}, "stage_args.llm.frobnicate"),
    ("/v1/pipelines/text2image", {"prompt": "x", "max_tokens": L["max_tokens"] + 1}, "max_tokens"),
]


def test_each_limit_is_a_400_before_any_engine_work(guard, guard_client):
    before = engine_work(guard)
    for path, body, param in OVER:
        r = guard_client.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
    assert engine_work(guard) == before


def test_text_prompt_tokens_are_counted_before_the_engine(guard, guard_client):
    before = engine_work(guard)
    r = guard_client.post("/v1/completions", json={"prompt": "word " * (2 * L["max_prompt_tokens"]),
                                                   "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert engine_work(guard) == before


def test_body_size_by_header_and_by_count(guard, guard_client):
    big = b'{"prompt": "' + b"a" * L["max_body_bytes"] + b'"}'
    r = guard_client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "larger than" in r.json()["error"]["message"], r.text

    def chunks():                      # no Content-Length: the Gate counts what arrives
        yield b'{"prompt": "'
        for _ in range(L["max_body_bytes"] // 4096 + 1):
            yield b"a" * 4096
        yield b'"}'

    r = guard_client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "larger than" in r.json()["error"]["message"], r.text
    ok = guard_client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})
    assert ok.status_code == 200
