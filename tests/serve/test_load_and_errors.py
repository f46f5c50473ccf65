"""Concurrency (continuous batching across HTTP requests), disconnects, and OpenAI error bodies."""

import asyncio
import json
import time

import pytest

pytestmark = pytest.mark.ray


def llm_stats(client) -> dict:
    return client.get("/info").json()["stages"]["llm"]["stats"]


def test_32_concurrent_chats_share_batches(client, omni_url):
    import httpx

    before = llm_stats(client)

    async def one(c: httpx.AsyncClient, i: int):
        r = await c.post("/v1/chat/completions", json={
            "model": "tiny-qwen3", "messages": [{"role": "user", "content": f"request number {i}"}],
            "max_tokens": 16, "ignore_eos": True, "seed": i})
        return r.status_code, r.json()

    async def main():
        async with httpx.AsyncClient(base_url=omni_url, timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    assert [s for s, _ in results] == [200] * 32, [b for s, b in results if s != 200][:2]
    assert all(b["usage"]["completion_tokens"] == 16 for _, b in results)
    after = llm_stats(client)
    decode_tokens = after["decode_tokens"] - before["decode_tokens"]
    steps = after["steps"] - before["steps"]
    assert decode_tokens >= 32 * 15
    assert decode_tokens > steps            # more tokens than forward passes: steps batched requests
    assert after["max_batch_size"] > 1


def test_disconnect_aborts_the_engine_request(client, omni_url):
    import httpx

    req = {"model": "tiny-qwen3", "prompt": "go on", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=omni_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=req) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            assert llm_stats(client)["num_running"] >= 1
    # the client went away after the first chunk; the engine must drop the request long before 900 tokens
    deadline = time.monotonic() + 60
    while (s := llm_stats(client))["num_running"] + s["num_waiting"] + s["num_streams"] > 0:
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    assert s["num_free_blocks"] == s["num_blocks"]


def test_cancel_by_id_through_the_scheduler(client, omni_url):
    import httpx

    req = {"model": "tiny-qwen3", "prompt": "go on", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=omni_url, timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=req) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            rid = json.loads(first[len("data: "):])["id"]
            assert client.post(f"/v1/requests/{rid}/cancel").json() == {"id": rid, "cancelled": True}
            rest = [json.loads(x[6:]) if x != "data: [DONE]" else x for x in lines if x.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and rest[-2]["error"]["type"] == "cancelled", rest[-3:]
    tokens = sum(len(ev["choices"][0]["text"]) > 0 for ev in rest[:-2])
    assert tokens < 900
    # the ingress reports the request's end to the scheduler in its next event batch; once it has,
    # a second cancel finds nothing to cancel
    deadline = time.monotonic() + 20
    while client.post(f"/v1/requests/{rid}/cancel").json()["cancelled"]:
        assert time.monotonic() < deadline, "the scheduler never recorded the cancelled request's end"
        time.sleep(0.1)


def _error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1024}, "max_tokens"),       # prompt + max_tokens > max_model_len (1024)
    ({"prompt": ""}, "prompt"),
    ({"prompt": [99999]}, "prompt"),                            # token id outside the vocabulary
    ({"max_tokens": 3}, "prompt"),                              # missing field: pydantic -> 400, not 422
])
def test_completion_bad_input_is_400(client, body, param):
    err = _error(client.post("/v1/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_chat_bad_input_is_400(client):
    _error(client.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    _error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                     "stream": True, "max_tokens": 1020}), 400, "max_tokens")
    _error(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
           400)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "size": "12x"}, "size"),
    ({"prompt": "x", "size": "100x100"}, "size"),               # not a multiple of 8
    ({"prompt": "x", "size": "4096x4096"}, "size"),             # over the pixel limit
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "num_inference_steps": 1000}, "num_inference_steps"),
    ({"prompt": "x", "cache": "nope"}, "cache.method"),
])
def test_images_bad_input_is_400(client, body, param):
    _error(client.post("/v1/images/generations", json=body), 400, param)


def test_unknown_model_and_pipeline_are_404(client):
    err = _error(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert err["type"] == "not_found_error"
    _error(client.post("/v1/images/generations", json={"model": "dall-e-3", "prompt": "x"}), 404, "model")
    _error(client.post("/v1/pipelines/nope", json={"prompt": "x"}), 404, "pipeline")
    _error(client.get("/v1/nothing-here"), 404)


def test_bad_stream_pipeline_input_fails_before_the_stream(client):
    r = client.post("/v1/pipelines/image", json={"prompt": "x", "size": "64x64", "stream": True,
                                                 "cache": {"method": "fbcache", "threshold": -1}})
    _error(r, 400, "cache.threshold")          # raised by the DiT replica, reported before the stream opens


def test_errors_do_not_disturb_other_requests(client):
    ok = client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3


def test_health_and_info(client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert set(info["stages"]) == {"llm", "vl", "image", "image-llm", "qwen-image-encoder", "qwen-image",
                                   "qwen-image-edit-encoder", "qwen-image-edit", "video", "video-i2v",
                                   "omni", "omni-talker", "omni-token2wav"}
    assert set(info["versions"]) >= {"omni_ray", "ray", "torch"}
    assert set(info["pipelines"]) == {"chat", "image", "text2image", "text2image-llm-encoder",
                                      "qwen-image", "qwen-image-edit", "video", "omni"}
    assert info["stages"]["omni-talker"]["kind"] == "talker" and info["stages"]["omni-talker"]["voices"]
    assert "scheduler" in info
    assert info["stages"]["image"]["kind"] == "dit" and info["stages"]["llm"]["stats"]["healthy"]


def test_a_batched_stream_that_leaves_is_aborted_on_its_replica(client, omni_url):
    """The ingress's batched stage call through real Serve handles: three streams in one call; the
    one whose caller leaves is aborted on the replica that runs it (``abort`` pinned there by
    deployments.stages.routing) while the other two finish."""
    from ray import serve

    from deployments.ingress.call_batcher import StreamBatcher
    from omni_ray.ar.sampling_params import SamplingParams
    from omni_ray.stages import ARRequest

    before = llm_stats(client)

    async def take(b, i: int, max_tokens: int, stop_after: int | None = None) -> int:
        req = ARRequest(f"pin-{i}-{time.monotonic_ns()}", prompt=f"batched request {i}",
                        params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        n = 0
        async for d in b.stream(req):
            n += len(d["token_ids"])
            if stop_after is not None:
                break
        return n

    async def main():
        h = serve.get_deployment_handle("llm", "omni")
        b = StreamBatcher(h.options(stream=True), h.options(stream=False))
        got = await asyncio.gather(take(b, 0, 900, stop_after=1), take(b, 1, 12), take(b, 2, 12))
        while b.aborts_in_flight:
            await asyncio.sleep(0.05)
        return b.calls, got

    calls, (partial, a, c) = asyncio.run(main())
    assert calls == 1 and a == c == 12 and 0 < partial < 900
    deadline = time.monotonic() + 60
    while (s := llm_stats(client))["num_running"] + s["num_waiting"] + s["num_streams"] > 0:
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    assert s["decode_tokens"] - before["decode_tokens"] < 450      # the 900-token request stopped early
    assert s["num_free_blocks"] == s["num_blocks"]
