"""The Gate without Ray: API keys, body size, stray exceptions turned into OpenAI errors."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI

from deployments.ingress.gate import Gate, GateSettings
from deployments.ingress.http import install_handlers
from omni_ray.config import AppConfig, validate
from omni_ray.errors import ConfigError

KEY = "unit-test-key-123"


# ----------------------------------------------------------------------------- the Gate
def gate_app(keys=(KEY,), max_body=2048, configured=True) -> FastAPI:
    app = FastAPI()
    install_handlers(app)
    app.add_middleware(Gate)
    if configured:
        app.state.gate = GateSettings.from_app(validate(AppConfig, {"api_keys": list(keys),
                                                                    "limits": {"max_body_bytes": max_body}}))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(body: dict):
        return {"n": len(json.dumps(body))}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    @app.get("/dead")
    async def dead():
        import ray.exceptions
        raise ray.exceptions.ActorDiedError()

    return app


async def call(app, method, path, **kw) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(method, path, **kw)


def run(coro):
    import asyncio
    return asyncio.run(coro)


@pytest.mark.parametrize("auth,status", [(None, 401), ("Bearer nope-nope-nope", 401), (f"Bearer {KEY}", 200),
                                         (f"bearer {KEY}", 200), (f"Basic {KEY}", 401), (KEY, 401),
                                         ("Bearer", 401), (f"Bearer {KEY} ", 200)])
def test_keys(auth, status):
    headers = {"authorization": auth} if auth else {}
    r = run(call(gate_app(), "POST", "/echo", json={"a": 1}, headers=headers))
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"


def test_health_open_and_unconfigured_gate_fails_closed():
    assert run(call(gate_app(), "GET", "/health")).status_code == 200
    app = gate_app(configured=False)
    assert run(call(app, "GET", "/health")).status_code == 200
    r = run(call(app, "POST", "/echo", json={}))
    assert r.status_code == 503 and r.json()["error"]["type"] == "resource_error"


def test_no_keys_means_open():
    assert run(call(gate_app(keys=()), "POST", "/echo", json={"a": 1})).status_code == 200


def test_every_key_is_compared(monkeypatch):
    """No early exit on a match: the number of compares does not depend on which key matched."""
    import deployments.ingress.gate as gate

    calls = []
    real = gate.hmac.compare_digest
    monkeypatch.setattr(gate.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    s = GateSettings.from_app(validate(AppConfig, {"api_keys": ["first-key-000", "second-key-00", "third-key-000"]}))
    for presented in (b"Bearer first-key-000", b"Bearer third-key-000", b"Bearer wrong-key-000"):
        calls.clear()
        s.authorized(presented)
        assert len(calls) == 3


def test_env_keys(monkeypatch):
    monkeypatch.setenv("OMNI_RAY_API_KEYS", "env-key-1234, other-key-5678")
    s = GateSettings.from_app(validate(AppConfig, {}))
    assert s.authorized(b"Bearer other-key-5678") and not s.authorized(b"Bearer env-key")


def test_short_or_padded_keys_are_a_config_error():
    for bad in (["short"], [" padded-key-123"], [""]):
        with pytest.raises(ConfigError):
            validate(AppConfig, {"api_keys": bad})


def test_trust_remote_code_is_a_config_error():
    from omni_ray.ar import LLM
    from omni_ray.config import ModelConfig

    with pytest.raises(ConfigError, match="trust_remote_code"):
        validate(ModelConfig, {"path": "tiny:qwen3", "trust_remote_code": True})
    with pytest.raises(ConfigError, match="trust_remote_code"):
        LLM("tiny:qwen3", device="cpu", trust_remote_code=True)
    assert validate(ModelConfig, {"path": "tiny:qwen3", "trust_remote_code": False}).trust_remote_code is False


def test_body_limit_by_header_and_by_count():
    app = gate_app()
    keyed = {"authorization": f"Bearer {KEY}"}
    big = json.dumps({"a": "x" * 3000}).encode()
    r = run(call(app, "POST", "/echo", content=big, headers=keyed | {"content-type": "application/json"}))
    assert r.status_code == 400 and "larger than 2048" in r.json()["error"]["message"]

    async def chunks():
        yield b'{"a": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    r = run(call(app, "POST", "/echo", content=chunks(), headers=keyed | {"content-type": "application/json"}))
    assert r.status_code == 400 and "larger than 2048" in r.json()["error"]["message"], r.text
    r = run(call(app, "POST", "/echo", json={"a": "x" * 100}, headers=keyed))
    assert r.status_code == 200


def test_stray_exceptions_become_openai_errors():
    keyed = {"authorization": f"Bearer {KEY}"}
    r = run(call(gate_app(), "GET", "/boom", headers=keyed))
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    r = run(call(gate_app(), "GET", "/dead", headers=keyed))
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_error"
